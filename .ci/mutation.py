"""Mutation testing of the lowerings and passes (`make mutation`, a slow tier: hours on 2 cores).

Each file is mutated by cosmic-ray in a clean worktree of HEAD (mutants are written in place there, never in
this checkout) and judged by the tests that guard it (TESTS_FOR). Sessions live in .mutation/<file>.sqlite and
resume where they stopped (on the same HEAD; delete a session after changing its file); the summary (killed /
total per file, every survivor's diff) goes to .mutation/summary.json and .mutation/<file>.survivors.txt.

    python .ci/mutation.py [lowerings/activation.py ...]     # default: every file of TESTS_FOR
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".mutation"
PACKAGE = "dsv4_compile/lowering"
# file under dsv4_compile/lowering -> the tests that must kill its mutants
TESTS_FOR: dict[str, tuple[str, ...]] = {
    "lowerings/activation.py": ("tests/lowerings/test_activation.py",),
    "lowerings/attention.py": ("tests/lowerings/test_attention.py",),
    "lowerings/flashmla.py": ("tests/lowerings/test_flashmla.py",),
    "lowerings/fp8_ds_mla.py": ("tests/lowerings/test_kv_cache.py", "tests/lowerings/test_cache_writes.py"),
    "lowerings/kv_cache.py": ("tests/lowerings/test_kv_cache.py", "tests/lowerings/test_cache_writes.py"),
    "lowerings/mhc.py": ("tests/lowerings/test_mhc.py",),
    "lowerings/mhc_vllm.py": ("tests/lowerings/test_mhc_vllm.py",),
    "lowerings/o_proj.py": ("tests/lowerings/test_o_proj.py",),
    "lowerings/routing.py": ("tests/lowerings/test_routing.py",),
    "passes/aux_streams.py": ("tests/test_pass_aux_streams.py",),
    "passes/device_constants.py": ("tests/test_pass_device_constants.py",),
    "passes/lower_ops.py": ("tests/test_pass_lower_ops.py", "tests/test_pass_lower_mutating_ops.py"),
    "passes/pdl.py": ("tests/test_pass_pdl.py",),
    "passes/audit.py": ("tests/test_pass_audit.py", "tests/test_vllm_constructs.py"),
    "passes/narrow_matmuls.py": ("tests/test_pass_narrow_matmuls.py",),
}


BIN = Path(sys.executable).parent  # cosmic-ray's console scripts, beside this interpreter


def cosmic_ray(*args: str, cwd: Path) -> str:
    done = subprocess.run([str(BIN / "cosmic-ray"), *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout


def run_file(name: str, tree: Path) -> dict[str, object]:
    stem = name.replace("/", "_").removesuffix(".py")
    session, config = STATE / f"{stem}.sqlite", STATE / f"{stem}.toml"
    tests = " ".join(TESTS_FOR[name])
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{PACKAGE}/{name}"\n'
        "timeout = 600.0\nexcluded-modules = []\n"
        f'test-command = "{sys.executable} -m pytest -x -q -p no:cacheprovider {tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n')
    if not session.exists():
        cosmic_ray("init", str(config), str(session), cwd=tree)
    cosmic_ray("exec", str(config), str(session), cwd=tree)
    report = subprocess.run([str(BIN / "cr-report"), "--show-diff", str(session)], capture_output=True, text=True,
                            check=True).stdout
    jobs = report.split("[job-id]")[1:]
    survivors = [job for job in jobs if "TestOutcome.SURVIVED" in job]
    (STATE / f"{stem}.survivors.txt").write_text("[job-id]".join(["", *survivors]))
    total = sum("test outcome:" in job for job in jobs)
    return {"file": f"{PACKAGE}/{name}", "mutants": total, "survived": len(survivors),
            "killed_percent": round(100 * (total - len(survivors)) / total, 1) if total else None}


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(TESTS_FOR))
    if unknown:
        raise SystemExit(f"no tests listed for {unknown}; known: {sorted(TESTS_FOR)}")
    STATE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=REPO, check=True,
                       capture_output=True)
        try:
            results = [run_file(name, tree) for name in names or list(TESTS_FOR)]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    (STATE / "summary.json").write_text(json.dumps(results, indent=1))
    for result in results:
        print(f"{result['file']}: {result['killed_percent']}% killed of {result['mutants']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
