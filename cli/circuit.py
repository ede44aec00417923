"""`lorsa-surgery circuit`: the circuit of heads behind one prediction, as graph.json and circuit.html."""

from __future__ import annotations

from pathlib import Path

import click

from lorsa_surgery.cli.interventions import _single_token
from lorsa_surgery.cli.loading import POSITIVE, TEXT, load_with_modules, loading_options, lorsa_option, overwrite_option
from lorsa_surgery.errors import LorsaSurgeryError

SHARE = click.FloatRange(0, 1, min_open=True)


def _metric(name: str, tokenizer, token: str | None, vs_token: str | None):
    from lorsa_surgery.interventions.patching import LogitDiff, Loss, Probability

    if name == "loss":
        return Loss()
    if name == "logprob":
        return Probability(_single_token(tokenizer, token, "--token"), log=True)
    return LogitDiff(_single_token(tokenizer, token, "--token"), _single_token(tokenizer, vs_token, "--vs-token"))


@click.command()
@click.argument("model")
@lorsa_option
@click.option("--mode", type=click.Choice(["replace", "exact"]), default=None, help="Splice mode (default: replace, or the patched model's).")
@click.option("--prompt", required=True, type=TEXT, help="The prompt whose prediction is explained.")
@click.option("--corrupt", type=TEXT, help="A corrupted prompt of as many tokens: the baseline activations come from it.")
@click.option("--baseline", type=click.Choice(["corrupt", "mean", "zero"]), default=None,
              help="What a head's activation is compared with [default: corrupt with --corrupt, else mean over the prompt].")
@click.option("--metric", type=click.Choice(["logit-diff", "logprob", "loss"]), default="logit-diff", show_default=True)
@click.option("--token", help="Token (text) scored at the last position by logit-diff and logprob: exactly one token.")
@click.option("--vs-token", help="The other token of logit-diff.")
@click.option("--targets", default=30, show_default=True, type=POSITIVE, help="Downstream nodes whose Q/K/V edges are attributed.")
@click.option("--mlps", type=click.Choice(["direct", "linearised"]), default="direct", show_default=True,
              help="Edges along the residual stream only, or also through MLPs linearised at the clean point.")
@click.option("--node-share", default=0.8, show_default=True, type=SHARE, help="Share of the total |attribution| the nodes kept carry.")
@click.option("--edge-share", default=0.8, show_default=True, type=SHARE, help="Share of the edges' |weight| the edges kept carry.")
@click.option("--max-nodes", default=60, show_default=True, type=POSITIVE, help="At most this many nodes in the graph.")
@click.option("--verify-prompt", "verify_prompts", multiple=True, type=TEXT,
              help="More prompts for faithfulness and necessity (measured on --prompt and these). Repeatable.")
@click.option("--no-verify", is_flag=True, help="Skip faithfulness and necessity.")
@click.option("--scan", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder written by `heads scan`: nodes link to their heads' pages in it.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for graph.json and circuit.html.")
@overwrite_option
@loading_options
def circuit(**o) -> None:
    """Attribute MODEL's prediction on --prompt to its Lorsa heads (nodes, and Q/K/V edges between them), prune to a
    graph, check it, and write graph.json and circuit.html to --out."""
    from lorsa_surgery.analysis.circuit_page import circuit_page, scan_links
    from lorsa_surgery.analysis.circuits import attribute, attribute_edges, faithfulness, head_stats, necessity, prune
    from lorsa_surgery.host.models import prompt_ids
    from lorsa_surgery.io import files

    files.check_out(o["out"], overwrite=o["overwrite"])
    if o["corrupt"] is not None and o["baseline"] not in (None, "corrupt"):
        raise LorsaSurgeryError(f"--corrupt gives a corrupt baseline; leave it out for --baseline {o['baseline']}.")
    if o["baseline"] == "corrupt" and o["corrupt"] is None:
        raise LorsaSurgeryError("--baseline corrupt needs --corrupt PROMPT.")
    _, tokenizer, handle = load_with_modules(o["model"], o["lorsa_specs"], o["mode"], o["revision"], o["base"],
                                             o["allow_pickle"], o["placement"])
    if handle is None:
        raise LorsaSurgeryError("A circuit runs through Lorsa heads: pass --lorsa LAYER=PATH (all=default for every layer) "
                                "or a patched model.")
    metric = _metric(o["metric"], tokenizer, o["token"], o["vs_token"])
    ids = prompt_ids(handle.model, tokenizer, o["prompt"])
    corrupt = prompt_ids(handle.model, tokenizer, o["corrupt"]) if o["corrupt"] is not None else None
    if corrupt is not None and corrupt.shape != ids.shape:
        raise LorsaSurgeryError(f"--corrupt is {corrupt.shape[1]} tokens and --prompt {ids.shape[1]}: they must be as long.")
    nodes = attribute(handle, ids, metric, corrupt, o["baseline"])
    edges = attribute_edges(nodes, top=o["targets"], mlps=o["mlps"]) if len(handle.layers) > 1 else None
    graph = prune(nodes, edges, o["node_share"], o["edge_share"], tokenizer=tokenizer, max_nodes=o["max_nodes"])
    if not o["no_verify"] and graph.nodes:
        prompts = [ids] + [prompt_ids(handle.model, tokenizer, text) for text in o["verify_prompts"]]
        stats = head_stats(handle, prompts)
        graph.verification["faithfulness"] = faithfulness(handle, prompts, graph, metric, stats=stats).to_dict()
        try:
            graph.verification["necessity"] = necessity(handle, prompts, graph, metric, stats=stats).to_dict()
        except LorsaSurgeryError as e:  # a circuit of every head leaves nothing to compare it with
            graph.verification["necessity"] = {"skipped": str(e)}
    with files.new_folder(o["out"], overwrite=o["overwrite"], kind="circuit") as staging:
        graph.save(staging / "graph.json")
        files.write_text(staging / "circuit.html", circuit_page(graph, scan_links(graph, o["scan"], o["out"])))
    click.echo(f"{graph.metric}: clean {graph.clean_metric:.4f}, baseline ({graph.baseline}) {graph.baseline_metric:.4f}; "
               f"attribution total {nodes.total():.4f}")
    click.echo(f"{len(graph.nodes)} nodes, {len(graph.edges)} edges; top nodes:")
    for node in graph.nodes[:10]:
        label = f" ({node['label']})" if node["label"] else ""
        click.echo(f"  {node['id']:<18}{label} {node['token']!r:<14} {node['attribution']:+.4f}")
    for name, result in graph.verification.items():
        if "skipped" in result:
            click.echo(f"{name}: skipped ({result['skipped']})")
            continue
        share = result["share"] if name == "faithfulness" else result["lost"]
        click.echo(f"{name}: {share['mean']:.3f} [{share['low']:.3f}, {share['high']:.3f}] over {result['prompts']} prompt(s)")
    click.echo(f"Wrote {o['out'] / 'graph.json'} and {o['out'] / 'circuit.html'}")
