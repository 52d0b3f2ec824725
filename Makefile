# instdiff -- every target sets itself up (creates .venv on first use).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= outputs
export HF_HUB_DISABLE_TELEMETRY := 1

PROFILE ?= smoke
.PHONY: setup report lab demo test test-fast bench clean

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

## JupyterLab on the notebooks, with the project's venv as the kernel.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks

## Demo images from our layout files with the embedded default model.
demo: $(STAMP)
	$(BIN)/instdiff generate layouts/boxes_kitchen_animals.json --out $(OUT)/demo --steps 25 --num-images 2
	$(BIN)/instdiff generate layouts/masks_street.json --out $(OUT)/demo --steps 25 --num-images 2
	$(BIN)/instdiff generate layouts/mixed_formats.json --out $(OUT)/demo --steps 25 --num-images 2 --drop all
	@echo "demo images in $(OUT)/demo (model: the embedded default; see README)"

## All tests (CPU, minutes). The parity tests read ../shared/parity (or $$INSTDIFF_PARITY_DIR).
test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/instdiff bench --config tiny --steps 10 --instances 4

clean:
	rm -rf $(OUT) .pytest_cache
