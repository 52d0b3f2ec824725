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
