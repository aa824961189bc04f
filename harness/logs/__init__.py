"""Reading and writing run logs: `format` (the text contract: the writer and the parser, defined
only there), `runs` (runs as readers see them: discovery, status, summary, grouping, the live
monitor), `provenance` (the sources and environment a log records) and `lock` (one writer per
run id)."""
