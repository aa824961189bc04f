"""The research studies: each module has `run(out_dir, quick=False, seed=0, **sizes) -> dict` and a
command line `python -m experiments.NAME --out DIR [--quick] [size flags]`; each writes figures
(PNG) and a markdown table (table.md) to its output folder."""
