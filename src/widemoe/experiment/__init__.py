"""`widemoe experiment` (issue 14, in progress): seeded grids of `widemoe train` runs, judged with statistics.

`suite` reads suite files (TOML: arms, comparisons with decision rules fixed before running, the
interleaved run order; the shipped `suites/seed-claims.toml`); `stats` holds the aggregator's statistics
core: the pooled noise estimate, paired and Welch differences with their t-intervals, the Holm
correction and the verdict rules. The runner and the report come later.
"""
