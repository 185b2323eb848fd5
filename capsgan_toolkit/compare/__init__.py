"""``capsgan compare``: train arms under one budget and seeds, evaluate them with one protocol, report.

The modules, from the bottom up:

- :mod:`.spec`: the comparison spec (a validated TOML file) and the overrides it implies;
- :mod:`.stats`: means, t-intervals, paired differences, bootstrap intervals, verdicts;
- :mod:`.fairness`: the keys on which the arms' resolved recipes differ, and which are refused;
- :mod:`.cost`: FLOPs per image with torch's flop counter;
- :mod:`.collect`: read run folders into per-run records (numbers, curves, pictures);
- :mod:`.probe_section`: the spatial-structure probe's numbers per arm (when the runs were probed);
- :mod:`.report`: the comparison (``compare.json``), ``compare.md`` and the terminal table;
- :mod:`.html`: the self-contained ``compare.html``;
- :mod:`.runner`: the grid of arm x seed runs: train, resume, evaluate, shard, spread over devices;
- :mod:`.command`: the ``capsgan compare`` click command.
"""
