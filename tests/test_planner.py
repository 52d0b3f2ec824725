"""Tests for instdiff_lib.extension.planner against a real HTTP server on loopback (instdiff_lib/extension/llm_stub.py)."""

import json
import time

import pytest

from instdiff_lib.layouts.layout import Layout
from instdiff_lib.extension.planner import (
    OFFLINE_LABEL,
    LLMPlanner,
    OfflinePlanner,
    PlannerError,
    PlanReport,
    PlanSchemaError,
    build_messages,
    map_category,
    parse_plan,
    plan_many,
    repair_box,
)

from instdiff_lib.extension.llm_stub import Raw, Reply, ScriptedLLMServer, Sleep, Status

W = H = 512


def answer(instances=None, caption="a girl walking a puppy in a park"):
    if instances is None:
        instances = [
            {"category": "girl", "caption": "a girl in a red coat", "box_xyxy": [100, 150, 200, 450]},
            {"category": "puppy", "caption": "a small brown puppy", "box_xyxy": [220, 380, 320, 460]},
            {"category": "tree", "caption": "a tall oak tree", "box_xyxy": [350, 20, 500, 400]},
        ]
    return json.dumps({"caption": caption, "instances": instances})


@pytest.fixture
def llm_server(monkeypatch):
    """start(*steps, repeat_last=True) -> a running ScriptedLLMServer; all are stopped after the test."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(*steps, repeat_last=True):
        s = ScriptedLLMServer(list(steps), repeat_last=repeat_last).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def planner_for(server, **kw):
    opts = dict(model="test-model", base_url=server.base_url, api_key="sk-test", n_instances=(1, 8),
                max_retries=3, timeout=5.0, backoff_base=0.01, backoff_max=0.05)
    opts.update(kw)
    return LLMPlanner(**opts)


# ---- end to end against the server ---------------------------------------------------------------------------


def test_valid_answer(llm_server):
    server = llm_server(Reply(answer()))
    planned = planner_for(server).plan("a girl walking a puppy in a park")
    layout = planned.layout
    assert isinstance(layout, Layout) and (layout.width, layout.height) == (W, H)
    assert planned.planner_label == "llm:test-model"
    assert [i.category for i in layout.instances] == ["person", "dog", "tree"]
    assert planned.is_coco == [True, True, False]
    # pixel xyxy -> normalised xyxy
    assert layout.instances[0].box == pytest.approx((100 / W, 150 / H, 200 / W, 450 / H))
    assert planned.boxes_xyxy_px()[0] == pytest.approx([100, 150, 200, 450])
    rep = planned.report
    assert (rep.n_requests, rep.n_retries, rep.n_repaired, rep.n_rejected) == (1, 0, 0, 0)
    assert rep.raw_responses == [answer()] and planned.raw == answer()
    # what was sent: json mode, the schema and the one box convention, temperature and seed, our model name
    req = server.requests[0]
    assert req["model"] == "test-model" and req["response_format"] == {"type": "json_object"}
    assert req["temperature"] == 0.7 and req["seed"] == 0
    user = req["messages"][-1]["content"]
    assert "box_xyxy" in user and "[x0, y0, x1, y1]" in user and "NOT [x, y, width, height]" in user
    assert "512 pixels wide" in user


def test_official_json_is_xywh_and_round_trips(llm_server, tmp_path):
    server = llm_server(Reply(answer()))
    report = plan_many("a girl walking a puppy", planner_for(server), tmp_path)
    doc = json.loads((tmp_path / "layout_0000.json").read_text())
    assert doc["planner"] == "llm:test-model"
    assert doc["annos"][0]["bbox"] == [100, 150, 100, 300]  # [x0, y0, x1 - x0, y1 - y0]
    assert doc["annos"][2]["is_coco"] is False and doc["annos"][2]["category_name"] == "tree"
    back = Layout.from_json(tmp_path / "layout_0000.json")
    assert back.instances[1].box == pytest.approx((220 / W, 380 / H, 320 / W, 460 / H))
    saved = json.loads((tmp_path / "plan_report.json").read_text())
    assert saved["n_written"] == 1 and saved["totals"]["n_requests"] == 1
    assert saved["layouts"][0]["boxes_xyxy_px"][0] == [100, 150, 200, 450]
    assert "api_key" not in json.dumps(saved["settings"]) and "sk-test" not in json.dumps(saved)
    assert report["n_failed"] == 0


def test_malformed_json_then_valid(llm_server):
    server = llm_server(Reply('{"caption": "a park", "instances": [ {"category": '), Reply(answer()))
    planned = planner_for(server).plan("a park")
    rep = planned.report
    assert (rep.n_requests, rep.n_retries) == (2, 1)
    assert "malformed JSON" in rep.errors[0]
    assert len(rep.raw_responses) == 2
    # the retry tells the model what was wrong, without growing the conversation without bound
    retry_msgs = server.requests[1]["messages"]
    assert len(retry_msgs) == 4 and "malformed JSON" in retry_msgs[-1]["content"]


def test_always_malformed_fails_clearly_after_max_retries(llm_server):
    server = llm_server(Reply("Sure! Here is your layout: caption = park"))
    with pytest.raises(PlannerError, match=r"no valid layout after 3 attempts \(max_retries=2\).*malformed JSON") as e:
        planner_for(server, max_retries=2).plan("a park")
    assert server.n_requests == 3
    assert e.value.report.n_requests == 3 and e.value.report.n_retries == 2
    assert len(e.value.report.errors) == 3


def test_schema_violation_then_valid(llm_server):
    bad = json.dumps({"caption": "x", "instances": [{"category": "dog", "box_xyxy": [1, 2, 3]}]})
    server = llm_server(Reply(bad), Reply(answer()))
    planned = planner_for(server).plan("a dog")
    assert planned.report.n_retries == 1
    assert "schema violation" in planned.report.errors[0] and "caption" in planned.report.errors[0]


def test_xywh_answer_is_a_schema_violation(llm_server):
    # [x, y, w, h] with w < x: x1 < x0 -> refused, never silently read as corners
    xywh = answer([{"category": "dog", "caption": "a dog", "box_xyxy": [300, 300, 100, 80]}])
    server = llm_server(Reply(xywh))
    with pytest.raises(PlannerError, match=r"x0 < x1 and y0 < y1.*not \[x, y, width, height\]"):
        planner_for(server, max_retries=1).plan("a dog")
    assert server.n_requests == 2


@pytest.mark.parametrize("n_instances, n_given, ok", [(3, 3, True), (3, 2, False), ((2, 4), 5, False)])
def test_instance_count(n_instances, n_given, ok):
    inst = [{"category": "dog", "caption": "a dog", "box_xyxy": [10, 10, 50, 50]}] * n_given
    data = json.loads(answer(inst))
    if ok:
        assert len(parse_plan(data, width=W, height=H, n_instances=n_instances).instances) == n_given
    else:
        with pytest.raises(PlanSchemaError, match="'instances' must have"):
            parse_plan(data, width=W, height=H, n_instances=n_instances)


def test_boxes_off_canvas_repaired_and_rejected(llm_server):
    inst = [
        {"category": "dog", "caption": "inside", "box_xyxy": [10, 10, 110, 110]},
        {"category": "cat", "caption": "60% on canvas", "box_xyxy": [452, 10, 552, 110]},  # clipped to x1 = 512
        {"category": "car", "caption": "exactly half", "box_xyxy": [-50, 200, 50, 300]},  # 50% -> clipped
        {"category": "bus", "caption": "20% on canvas", "box_xyxy": [492, 400, 592, 500]},  # rejected
        {"category": "kite", "caption": "fully off", "box_xyxy": [600, 600, 700, 700]},  # rejected
    ]
    server = llm_server(Reply(answer(inst)))
    planned = planner_for(server).plan("animals and cars")
    rep = planned.report
    assert (rep.n_repaired, rep.n_rejected) == (2, 2)
    assert [i.caption for i in planned.layout.instances] == ["inside", "60% on canvas", "exactly half"]
    assert planned.boxes_xyxy_px()[1] == pytest.approx([452, 10, 512, 110])
    assert planned.boxes_xyxy_px()[2] == pytest.approx([0, 200, 50, 300])
    assert rep.repaired[0]["overlap"] == pytest.approx(0.6) and rep.rejected[0]["overlap"] == pytest.approx(0.2)
    assert "20%" in rep.rejected[0]["reason"]
    assert len(rep.categories) == 3  # only kept instances


def test_all_boxes_off_canvas_is_refused(llm_server):
    inst = [{"category": "kite", "caption": "off", "box_xyxy": [600, 600, 700, 700]}]
    server = llm_server(Reply(answer(inst)), Reply(answer()))
    planned = planner_for(server).plan("a kite")
    # the refused answer's rejection is not counted against the accepted one
    assert planned.report.n_retries == 1 and planned.report.n_rejected == 0
    assert "no usable instance" in planned.report.errors[0]


def test_timeout_then_success(llm_server):
    server = llm_server(Sleep(1.5, Reply(answer())), Reply(answer()))
    t0 = time.monotonic()
    planned = planner_for(server, timeout=0.5).plan("a park")
    assert time.monotonic() - t0 < 3
    assert planned.report.n_requests == 2 and "timeout" in planned.report.errors[0]


def test_429_then_success_with_backoff(llm_server):
    server = llm_server(Status(429, headers={"Retry-After": "0.02"}), Status(503), Reply(answer()))
    planned = planner_for(server, backoff_base=0.01, backoff_max=0.1).plan("a park")
    rep = planned.report
    assert rep.n_requests == 3 and rep.n_retries == 2
    assert rep.errors[0].startswith("attempt 1: HTTP 429") and rep.errors[1].startswith("attempt 2: HTTP 503")
    assert rep.wait_s == pytest.approx(0.02 + 0.02)  # max(0.01, Retry-After 0.02), then 0.01 * 2
    assert server.n_requests == 3  # the openai client's own retries are off


def test_client_error_is_not_retried(llm_server):
    server = llm_server(Status(401, {"error": {"message": "invalid api key", "type": "auth"}}))
    with pytest.raises(PlannerError, match=r"HTTP 401 \(not retried\).*invalid api key"):
        planner_for(server).plan("a park")
    assert server.n_requests == 1


def test_broken_envelope_and_truncation_are_retried(llm_server):
    server = llm_server(Raw(b'{"unexpected": true}'), Raw(b"{not json"), Reply(answer()[:40], finish_reason="length"),
                        Reply(answer()))
    planned = planner_for(server).plan("a park")
    assert planned.report.n_retries == 3
    errors = planned.report.errors
    assert "no choices" in errors[0] and "bad response: JSONDecodeError" in errors[1] and "cut off" in errors[2]


def test_settings_from_env(llm_server, monkeypatch):
    server = llm_server(Reply(answer()))
    monkeypatch.setenv("INSTDIFF_LLM_BASE_URL", server.base_url)
    monkeypatch.setenv("INSTDIFF_LLM_MODEL", "env-model")
    monkeypatch.delenv("INSTDIFF_LLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p = LLMPlanner(n_instances=3, width=640, height=480, temperature=0.0, seed=7, scene_types=["kitchen"])
    planned = p.plan()  # no prompt: invents a scene of a (seeded) scene type
    assert planned.scene_type == "kitchen" and planned.planner_label == "llm:env-model"
    req = server.requests[0]
    assert req["model"] == "env-model" and req["seed"] == 7 and req["temperature"] == 0.0
    assert "kitchen" in req["messages"][-1]["content"] and "640 pixels wide" in req["messages"][-1]["content"]
    assert (planned.layout.width, planned.layout.height) == (640, 480)


def test_missing_settings_fail_clearly(monkeypatch):
    for k in ("INSTDIFF_LLM_BASE_URL", "INSTDIFF_LLM_MODEL", "INSTDIFF_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(PlannerError, match="no model name"):
        LLMPlanner()
    with pytest.raises(PlannerError, match="no API key for OpenAI"):
        LLMPlanner(model="gpt-4o")
    LLMPlanner(model="llama3", base_url="http://127.0.0.1:11434/v1")  # local servers need no key
    with pytest.raises(ValueError, match="n_instances"):
        LLMPlanner(model="m", base_url="http://127.0.0.1:1/v1", n_instances=31)


def test_unreachable_server_fails_after_bounded_retries():
    p = LLMPlanner(model="m", base_url="http://127.0.0.1:9/v1", max_retries=1, timeout=0.5, backoff_base=0.01)
    with pytest.raises(PlannerError, match="after 2 attempts.*connection error"):
        p.plan("a park")


def test_plan_many_records_failures(llm_server, tmp_path):
    server = llm_server(Reply(answer()), Reply("not json"), repeat_last=True)
    doc = plan_many(["a park", "a street"], planner_for(server, max_retries=1), tmp_path)
    assert (doc["n_written"], doc["n_failed"]) == (1, 1)
    assert doc["failed"][0]["prompt"] == "a street" and "malformed JSON" in doc["failed"][0]["error"]
    assert doc["totals"]["n_requests"] == 3 and doc["totals"]["n_retries"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout_0000.json", "plan_report.json"]
    with pytest.raises(PlannerError):
        plan_many(["a street"], planner_for(server, max_retries=0), tmp_path / "b", on_error="raise")


# ---- pure functions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, label, is_coco, how", [
    ("dog", "dog", True, "coco"), ("Girl", "person", True, "synonym"), ("boy", "person", True, "synonym"),
    ("woman", "person", True, "synonym"), ("children", "person", True, "synonym"), ("bike", "bicycle", True, "synonym"),
    ("puppy", "dog", True, "synonym"), ("kitten", "cat", True, "synonym"), ("lamb", "sheep", True, "synonym"),
    ("goat", "sheep", True, "synonym"), ("sofa", "couch", True, "synonym"), ("television", "tv", True, "synonym"),
    ("TV", "tv", True, "coco"), ("motorbike", "motorcycle", True, "synonym"), ("plane", "airplane", True, "synonym"),
    ("dogs", "dog", True, "coco"), ("traffic lights", "traffic light", True, "coco"),
    ("a red car", "car", True, "head-noun"), ("fire truck", "truck", True, "synonym"),
    ("tractor", "tractor", False, "free-text"), ("Coffee-Table", "dining table", True, "head-noun"),
    ("hot air balloon", "hot air balloon", False, "free-text"),
])
def test_map_category(name, label, is_coco, how):
    m = map_category(name)
    assert (m.label, m.is_coco, m.how, m.source) == (label, is_coco, how, name)


def test_repair_box_rule():
    assert repair_box([0, 0, 512, 512], W, H) == ("ok", (0, 0, 512, 512), 1.0)
    assert repair_box([-10, 0, 90, 100], W, H)[:2] == ("repaired", (0, 0, 90, 100))
    status, box, overlap = repair_box([-51, 0, 49, 100], W, H)  # 49% on canvas
    assert (status, box) == ("rejected", None) and overlap == pytest.approx(0.49)


def test_messages_say_one_convention():
    msgs = build_messages(None, width=640, height=480, n_instances=7, scene_type="agricultural")
    text = msgs[-1]["content"]
    assert "exactly 7" in text and "agricultural" in text and '"box_xyxy": [10, 20, 170, 180]' in text


# ---- offline planner ----------------------------------------------------------------------------------------


def test_offline_planner_is_deterministic_and_labelled(tmp_path):
    p = OfflinePlanner(n_instances=(2, 6), seed=3)
    a = p.plan("two dogs and a red bike next to a girl")
    b = p.plan("two dogs and a red bike next to a girl")
    assert a.planner_label == OFFLINE_LABEL == "offline-template"
    assert [i.category for i in a.layout.instances] == ["dog", "dog", "bicycle", "person"]
    assert [i.caption for i in a.layout.instances][:3] == ["a dog", "a dog", "a red bike"]
    assert a.layout.to_json() == b.layout.to_json()
    assert a.layout.to_json() != p.plan("two dogs and a red bike next to a girl", seed=4).layout.to_json()
    assert a.to_json()["planner"] == "offline-template" and a.report.n_requests == 0

    c = p.plan("a quiet scene", scene_type="indoor")  # no COCO noun: topped up from the scene template
    assert 2 <= len(c.layout.instances) <= 6 and c.scene_type == "indoor"

    doc = plan_many(3, OfflinePlanner(n_instances=3), tmp_path)
    assert doc["planner"] == "offline-template" and doc["n_written"] == 3
    assert doc["settings"]["note"].startswith("deterministic template")
    for e in doc["layouts"]:
        assert e["planner"] == "offline-template"
        lay = json.loads((tmp_path / e["file"]).read_text())
        assert lay["planner"] == "offline-template" and len(lay["annos"]) == 3
        Layout.from_json(tmp_path / e["file"])  # valid official format


def test_report_totals():
    r1 = PlanReport(n_requests=2, n_retries=1, n_repaired=1, categories=[{"is_coco": True}])
    r2 = PlanReport(n_requests=1, n_rejected=2, categories=[{"is_coco": False}, {"is_coco": True}])
    t = PlanReport.total([r1, r2])
    assert t["n_requests"] == 3 and t["n_retries"] == 1 and t["n_repaired"] == 1 and t["n_rejected"] == 2
    assert (t["n_instances_coco"], t["n_instances_free_text"]) == (2, 1)
