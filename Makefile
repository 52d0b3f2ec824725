# instdiff -- every target sets itself up (creates .venv on first use).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= outputs
export HF_HUB_DISABLE_TELEMETRY := 1

PROFILE ?= smoke
.PHONY: setup report rehearsal lab demo test test-fast bench bench-quality mutation clean

$(STAMP): pyproject.toml requirements.lock
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 required, found {sys.version.split()[0]} (set PY=/path/to/python3.11)"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test,lab]"
	touch $(STAMP)

setup: $(STAMP)

## The main job: every notebook with papermill (smoke: the Shapes mini model, data and evaluators, CPU), then
## blogpost.md; executed notebooks + HTML in $(OUT)/report/$(PROFILE). PROFILE=full: COCO + released weights (GPU).
report: $(STAMP)
	$(BIN)/instdiff report all --profile $(PROFILE)

## The full profile rehearsed on CPU at true size with synthetic assets (random weights, written once where the real
## ones go): download, convert, preflight, setup check, generation array, notebooks 10/11/20/30/99. Results labelled
## "rehearsal" in $(OUT)/rehearsal/, never in results/ or blogpost.md. See README, "Run the full protocol".
rehearsal: $(STAMP)
	$(BIN)/instdiff rehearse

## JupyterLab on the notebooks, with the project's venv as the kernel; opens the playground (02_playground) first.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(CURDIR)/notebooks/02_playground.ipynb

## Demo images from our layout files with the embedded default model.
demo: $(STAMP)
	$(BIN)/instdiff generate layouts/shapes/boxes.json --out $(OUT)/demo --steps 25 --guidance 3 --alpha 1 --num-images 2 --drop box
	$(BIN)/instdiff generate layouts/shapes/masks.json --out $(OUT)/demo --steps 25 --guidance 3 --alpha 1 --num-images 2 --drop all
	$(BIN)/instdiff generate layouts/shapes/mixed.json --out $(OUT)/demo --steps 25 --guidance 3 --alpha 1 --num-images 2 --drop all
	@echo "demo images in $(OUT)/demo (model: the committed Shapes mini model, models/shapes-mini; see README)"

## All tests (CPU, minutes). The parity tests read ../shared/parity (or $$INSTDIFF_PARITY_DIR).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Mutation testing (mutmut) of the metrics, layout/derive, keymap, UniFusion and the sampler, one module at a time
## with the tests that exercise it; scratch copies in outputs/mutation, scores vs tests/MUTATION.md. Hours on 2 cores;
## not in CI. MODULES="pim guards" for some of them.
mutation: $(STAMP)
	nice -n 15 $(BIN)/python tools/mutation.py $(MODULES)

bench: $(STAMP)
	$(BIN)/instdiff bench --config tiny --steps 10 --instances 4

## The Shapes mini model's quality bar (box AP50 >= 0.5, attribute accuracy above chance); CPU, minutes.
bench-quality: $(STAMP)
	$(BIN)/instdiff bench --quality

clean:
	rm -rf $(OUT) .pytest_cache
