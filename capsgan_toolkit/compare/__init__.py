"""``capsgan compare``: train arms under one budget and seeds, evaluate them with one protocol, report.

The modules, from the bottom up:

- :mod:`.spec`: the comparison spec (a validated TOML file) and the overrides it implies;
- :mod:`.stats`: means, t-intervals within each metric's range, paired differences, bootstrap
  intervals, verdicts, seeds needed, Holm;
- :mod:`.fairness`: the keys on which the arms' resolved recipes (and trained steps and images)
  differ, and which are refused;
- :mod:`.collect`: read run folders into per-run records (numbers, curves, pictures);
- :mod:`.contrasts`: the pairs of arms compared, the question (capsule vs CNN encoder) first;
- :mod:`.floors`: did each arm learn (above chance, better than the mean image, FID below its generator
  untrained) before it is compared;
- :mod:`.untrained`: the FID of each arm's generator untrained, measured once per protocol and kept;
- :mod:`.probe_section`: the spatial-structure probe's numbers per arm (when the runs were probed);
- :mod:`.headline`: the answer per contrast and key metric, in plain words;
- :mod:`.report`: the comparison (``compare.json``), ``compare.md`` and the terminal output;
- :mod:`.html`: the self-contained ``compare.html``;
- :mod:`.runner`: the grid of arm x seed runs: train, resume, evaluate, shard, spread over devices;
- :mod:`.worker`: one run of the grid in its own process;
- :mod:`.outputs`: writes compare.json, compare.md and compare.html;
- :mod:`.runs`: comparing run folders that exist (no spec).

The ``capsgan compare`` command itself is :mod:`capsgan_toolkit.cli.compare`; FLOP counting is
:mod:`capsgan_toolkit.evaluation.flops`.
"""
