import json

import pytest

from instdiff_lib.results import read_results, write_results


def test_results_carry_provenance(tmp_path):
    p = write_results(tmp_path / "r.json", {"AP": 0.5}, params={"SMOKE": True}, n_evaluated=10, n_skipped=1,
                      profile="smoke", wall_time_s=1.5)
    doc = read_results(p)
    assert doc["metrics"] == {"AP": 0.5} and doc["profile"] == "smoke" and doc["n_skipped"] == 1
    prov = doc["provenance"]
    assert len(prov["git_sha"]) == 40 and isinstance(prov["git_dirty"], bool)
    assert prov["versions"]["torch"] and prov["device"]
    with pytest.raises(ValueError, match="profile"):
        write_results(tmp_path / "x.json", {}, params={}, n_evaluated=0, profile="final")
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="not a results file"):
        read_results(tmp_path / "bad.json")


def test_git_dirty_ignores_the_reports_own_outputs(tmp_path):
    """A notebook rewriting results/, figures/ or blogpost.md does not stamp its siblings "dirty"; code does."""
    import subprocess

    from instdiff_lib.results import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "figures").mkdir()
    for name in ("results/a.json", "figures/a.png", "blogpost.md", "code.py"):
        (tmp_path / name).write_text("0")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_state(tmp_path)["git_dirty"] is False
    for name in ("results/a.json", "figures/a.png", "blogpost.md"):
        (tmp_path / name).write_text("1")
    (tmp_path / "untracked.txt").write_text("x")
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("1")
    assert git_state(tmp_path)["git_dirty"] is True
