"""The results pages under docs/results/ are generated from the benchmark JSONs and match them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.harness import RESULTS


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pages() -> list[report.Page]:
    return report.build(RESULTS)


def test_docs_results_match_the_json(pages: list[report.Page]) -> None:
    problems = report.differences(pages, report.DOCS)
    assert not problems, "\n".join(problems) + "\nrun `python -m benchmarks.report` and commit docs/results/"


def test_regenerated_pages_equal_the_committed_ones(pages: list[report.Page], tmp_path: Path) -> None:
    report.write(pages, tmp_path, render=False)
    for page in pages:
        assert (tmp_path / f"{page.name}.md").read_text() == (report.DOCS / f"{page.name}.md").read_text()
        for chart in page.charts:
            sidecar = Path(report.CHART_DIR) / f"{chart.name}.json"
            assert (tmp_path / sidecar).read_text() == (report.DOCS / sidecar).read_text()


def test_check_catches_an_edited_number_a_missing_chart_and_a_stale_page(pages, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(report.DOCS, docs)
    assert report.differences(pages, docs) == []
    page = docs / "reverse_distillation.md"
    page.write_text(re.sub(r"0\.99\d\d", "0.9999", page.read_text(), count=1))
    (docs / report.CHART_DIR / "rd_aupro_vs_size.png").unlink()
    (docs / "old_history.md").write_text("hand-kept\n")
    problems = "\n".join(report.differences(pages, docs))
    assert "differs from the JSON" in problems and "reverse_distillation.md" in problems
    assert "missing" in problems and "rd_aupro_vs_size.png" in problems
    assert "stale" in problems and "old_history.md" in problems
    assert report.main(["--check", "--out", str(docs)]) == 1


def test_pages_exist_per_scheme_and_name_no_work_period(pages: list[report.Page]) -> None:
    names = {page.name for page in pages}
    assert {"reverse_distillation", "score_regression", "progressive_gan", "index"} <= names
    for page in pages:
        assert not re.search(r"\bsessions? \d", page.markdown, re.IGNORECASE), page.name
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert not re.search(r"\bsessions? \d", readme, re.IGNORECASE)
    assert len(readme.splitlines()) < 150


def _write(folder: Path, name: str, runs: list[dict]) -> None:
    (folder / name).write_text(json.dumps({"runs": runs}))


def test_optional_pages_appear_with_their_json(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    common = {"provenance": "record", "git_commit": "abc", "command": "python -m benchmarks.x", "wall_s": 1.0}
    _write(results, "deploy.json", [
        {**common, "scheme": "reverse_distillation", "compression_ratio": r, "role": role, "runtime": rt,
         "latency_ms_b1": lat, "images_per_s_b32": 100.0, "params": p, "macs": 10 * p, "model_bytes": 4 * p}
        for r, role, rt, lat, p in [(16, "student", "torch", 5.0, 1000), (1, "teacher", "torch", 20.0, 9000),
                                    (16, "student", "onnxruntime", 3.0, 1000)]])
    _write(results, "mvtec.json", [
        {**common, "scheme": "rd", "category": c, "image_size": 256, "compression_ratio": 1.0, "seed": s,
         "image_auroc": 0.9 + 0.01 * s, "pixel_auroc": 0.95, "aupro": 0.9, "deployed_params": 100,
         "deployed_macs": 1000, "infer_images_per_s": 5.0, "deploy_latency_ms_b1": 12.0 + s}
        for c in ("bottle", "screw") for s in (0, 1)])
    _write(results, "map_regression.json", [
        {**common, "category": "bottle", "teacher_scheme": "rd", "requested_mac_ratio": r, "deployed_mac_ratio": r,
         "deployed_param_ratio": r, "seed": 0, "image_auroc": 0.98, "pixel_auroc": px, "aupro": 0.9,
         "teacher_image_auroc": 0.99, "teacher_pixel_auroc": 0.98, "teacher_aupro": 0.93,
         "student_latency_ms_b1": 1.0, "teacher_latency_ms_b1": 30.0} for r, px in [(10, 0.975), (30, 0.972)]]
        + [{**common, "category": "bottle", "teacher_scheme": "rd", "requested_mac_ratio": 30, "seed": 0,
            "student": "score_regression", "student_spec": "deep[8, 8]", "student_input_size": 128,
            "deployed_macs": 2e6, "deployed_mac_ratio": 31.0, "deployed_param_ratio": 900.0, "image_auroc": 0.91,
            "pixel_auroc": None, "aupro": None, "teacher_image_auroc": 0.99, "matched_map_deployed_macs": 2.1e6,
            "matched_map_image_auroc": 0.98, "student_latency_ms_b1": 0.5}])
    pages = {page.name: page for page in report.build(results)}
    assert {"deploy", "mvtec", "map_regression", "index"} <= set(pages)
    assert "reverse_distillation" not in pages  # its JSON is absent here
    mvtec = pages["mvtec"].markdown
    assert "| bottle | 0,1 | 0.9050 ± 0.0071 (n=2) |" in mvtec  # the table of benchmarks.mvtec
    assert "**mean over 2 categories**" in mvtec
    size = pages["mvtec"].charts[0]
    assert [s.label for s in size.series] == ["rd, bottle, 256 px", "rd, screw, 256 px"]
    assert size.series[0].y == [pytest.approx(0.95)] and size.series[0].x == [100.0]
    latency = next(c for c in pages["mvtec"].charts if "latency" in c.name)
    assert latency.series[0].x == [12.0, 13.0] and not latency.lines
    assert report.NO_LATENCY not in mvtec
    latency = next(c for c in pages["map_regression"].charts if "latency" in c.name)
    assert latency.series[0].x == [1.0] and latency.series[0].y == [pytest.approx(0.9735)]
    # the score-regression comparison row: its own table, never a point of the map students' charts
    assert "| bottle | rd | deep[8, 8] at 128 px | 2.0 M | 31.0 | 900 | 0.9100 | 0.9900 | 2.1 M / 0.9800 | 0.50 |" \
        in pages["map_regression"].markdown
    # two map students, the comparison row, and the ratio-30 map student again under it (every setting's, same size)
    assert pages["map_regression"].markdown.count("| bottle | rd |") == 4
    assert "| bottle | rd | default | - | 0.9800 | 0.9720 | 0.9000 | 1.00 |" in pages["map_regression"].markdown
    assert "python -m benchmarks.x" in pages["deploy"].markdown  # the records' own commands
    deploy_chart = pages["deploy"].charts[0]
    assert {s.label for s in deploy_chart.series} == {"reverse_distillation, student, torch",
                                                     "reverse_distillation, teacher, torch",
                                                     "reverse_distillation, student, onnxruntime"}
    out = tmp_path / "docs"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert (out / "charts" / "map_regression_pixel_auroc_vs_latency.png").stat().st_size > 0
    assert report.main(["--check", "--results", str(results), "--out", str(out)]) == 0


def test_mvtec_rows_stand_beside_the_published_figures_that_could_be_read(tmp_path: Path) -> None:
    """Each row carries its method's published figures for its category (and their mean on the mean row);
    a method whose figures could not be read says so instead of showing numbers."""
    from benchmarks import mvtec

    common = {"provenance": "record", "image_size": 256, "seed": 0, "pixel_auroc": 0.98, "aupro": 0.95}
    _write(tmp_path, "mvtec.json",
           [{**common, "scheme": "patchcore", "category": c, "compression_ratio": 1.0, "coreset_fraction": 0.1,
             "image_auroc": 0.99} for c in mvtec.CATEGORIES]
           + [{**common, "scheme": "rd", "category": "bottle", "compression_ratio": 1.0, "budget_rule": "validation",
               "epochs": 45, "image_auroc": 0.97}])
    lines = mvtec.results_table(tmp_path / "mvtec.json").splitlines()
    reference = mvtec.reference_of("patchcore")
    for category in mvtec.CATEGORIES:
        row = next(line for line in lines if line.startswith("| patchcore |") and f"| {category} |" in line)
        assert row.endswith(" | " + " / ".join(f"{v:.4f}" for v in reference.figures[category]) + " |")
    mean_row = next(line for line in lines if "**mean over 3 categories**" in line)
    expected = [sum(reference.figures[c][i] for c in mvtec.CATEGORIES) / 3 for i in range(3)]
    assert mean_row.endswith(" | " + " / ".join(f"{v:.4f}" for v in expected) + " |")
    rd_row = next(line for line in lines if line.startswith("| rd |"))
    assert "| validation: 45 epochs | bottle |" in rd_row and rd_row.endswith("| - |")
    for ref in mvtec.REFERENCES:  # figures for every category, or a note saying why there are none
        assert set(ref.figures) == set(mvtec.CATEGORIES) if ref.figures else ref.note
        assert all(v is None or 0.0 <= v <= 1.0 for values in ref.figures.values() for v in values)
    section = mvtec.references_section()
    assert all(f"**{ref.scheme}**" in section for ref in mvtec.REFERENCES) and "not quoted" in section


def test_the_gpu_plan_has_its_own_file_and_page_section_with_peak_memory(tmp_path: Path) -> None:
    """``--trainer gpu`` records go to ``mvtec_gpu.json``; the page shows them apart, with peak memory."""
    from benchmarks import mvtec

    common = {"provenance": "record", "git_commit": "abc", "command": "python -m benchmarks.mvtec", "image_size": 256,
              "seed": 0, "compression_ratio": 1.0, "image_auroc": 0.99, "pixel_auroc": 0.98, "aupro": 0.95}
    _write(tmp_path, mvtec.CPU_RESULTS, [{**common, "scheme": "rd", "category": "bottle"}])
    _write(tmp_path, mvtec.GPU_RESULTS, [{**common, "scheme": "rd", "category": "bottle", "device": "gpu",
                                          "peak_gpu_memory_bytes": 3 * 2**30, "gpu": "NVIDIA H200"}])
    assert "peak GPU memory" not in mvtec.results_table(tmp_path / mvtec.CPU_RESULTS)
    gpu_table = mvtec.results_table(tmp_path / mvtec.GPU_RESULTS)
    assert "peak GPU memory (GiB)" in gpu_table and "| 3.0000 |" in gpu_table
    assert all(line.count("|") == gpu_table.splitlines()[0].count("|") for line in gpu_table.splitlines())
    page = next(p for p in report.build(tmp_path) if p.name == "mvtec").markdown
    assert f"## The same plan on a GPU (`benchmarks/results/{mvtec.GPU_RESULTS}`)" in page
    assert f"`benchmarks/results/{mvtec.GPU_RESULTS}` | 1 | 1 |" in page


def test_mvtec_retention_sets_each_ratio_against_its_full_width_and_expert_against_rd(tmp_path: Path) -> None:
    from benchmarks import mvtec

    def run(scheme: str, ratio: float, seed: int, pixel: float, aupro: float, category: str = "bottle") -> dict:
        return {"scheme": scheme, "category": category, "image_size": 256, "compression_ratio": ratio, "seed": seed,
                "budget_rule": "validation", "image_auroc": 1.0, "pixel_auroc": pixel, "aupro": aupro}

    _write(tmp_path, "mvtec.json", [
        run("rd", 1, 0, 0.98, 0.96), run("rd", 16, 0, 0.97, 0.912), run("rd", 64, 1, 0.9, 0.9),  # 64: no seed-0 pair
        run("rd_expert", 1, 0, 0.99, 0.95), run("rd", 1, 1, 0.96, 0.94), run("rd_expert", 1, 1, 0.98, 0.96),
        {**run("rd", 16, 0, 0.5, 0.5, "screw"), "budget_rule": "fixed"}])  # a trial run: never compared
    table = mvtec.retention_table(tmp_path / "mvtec.json")
    assert "| rd | bottle | 16 | 0.9700 / 0.9800 = 0.9898 | 0.9120 / 0.9600 = 0.9500 |" in table
    assert "| 64 |" not in table and "screw" not in table
    # expert minus RD per (category, seed): pixel +0.01, +0.02; AUPRO -0.01, +0.02
    assert "pixel AUROC: +0.0150 ± 0.0050 (standard error over 2 category-seed pairs)" in table
    assert "AUPRO: +0.0050 ± 0.0150" in table
