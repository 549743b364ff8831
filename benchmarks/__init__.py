"""bioinverse benchmarks: ``python -m benchmarks <study>|all [--quick] [--out DIR]``.

Each study module defines ``TITLE`` and ``run(quick: bool, out: Path) -> StudyResult``; the runner
adds the machine description and writes ``DIR/<study>.json`` and ``DIR/<study>.md``.
"""

STUDIES = ["core_nnls", "dmri_qspace", "dmri_fingerprint", "cryoem_refine", "cryoem_implicit", "cryoem_red"]
