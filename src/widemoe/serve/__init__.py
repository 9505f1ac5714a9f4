"""`widemoe serve` (issue 13, in progress): an OpenAI-compatible server. So far: the wire protocol's
request checks and error shapes (`protocol`) and incremental detokenization with stop strings (`detok`)."""
