"""Safe writes, confined reads and Hub transport: the ground every other layer stands on."""
