"""`lorsa-surgery push` and `pull`: publish a folder to the Hugging Face Hub as one commit, and fetch one back."""

from pathlib import Path

import click


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo-id", required=True, help="Target model repo, NS/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Make the repo private when creating it.")
@click.option("--revision", help="Branch to commit to; created from main if missing.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", help="Commit title.")
def push(folder: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool, commit_message: str | None) -> None:
    """Upload every file in FOLDER to a Hub repo as one commit; print the commit (or pull request) URL."""
    from lorsa_surgery.io.hub import push_folder

    info = push_folder(
        folder, repo_id, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message
    )
    click.echo(info.pr_url or info.commit_url)


@click.command()
@click.argument("source")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the files to.")
@click.option("--overwrite", is_flag=True, help="Replace --out if an earlier pull or lorsa-surgery run wrote it.")
def pull(source: str, revision: str | None, out_dir: Path, overwrite: bool) -> None:
    """Download the Hub repo SOURCE (NS/NAME, or NS/NAME:SUBFOLDER for one subfolder) into --out; print the folder.

    --out is written whole: a pull that fails leaves it as it was."""
    from lorsa_surgery.io.hub import pull as pull_source

    click.echo(pull_source(source, revision=revision, out_dir=out_dir, overwrite=overwrite))
