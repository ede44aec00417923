"""The names the head-family tools take, without torch, so the command line lists them in its help: the families
`families.detect` scores (`families.FAMILIES` holds their probes and thresholds, in this order), the behaviours a
causal check measures (`causal.causal_check`), and where induction prompts take their words."""

FAMILY_NAMES = ("previous_token", "duplicate_token", "induction", "attention_sink", "successor", "name_mover", "arithmetic",
                "thematic_anchor")
"""Every head family, in the order `families.detect` reports them."""

BEHAVIOURS = {
    "induction": "next-token accuracy on the second half of repeated random word sequences",
    "name_mover": "IOI logit difference, indirect object minus subject",
    "successor": "minus the mean rank of the next ordinal item",
}
"""The families with a causal check, and the behaviour it measures."""

WORDS = ("random", "family")
"""Where induction prompts take their words: the whole vocabulary, or the family's promoted words (`family_words`)."""
