# Quick start: `make demo` (set up, train conventional and ARMED spiral bundles, print the comparison) and `make test`.
VPY := .venv/bin/python
BUNDLE := bundles/armed_spirals
RUNS := runs/spirals

.PHONY: setup demo test clean

setup:
	bash tools/setup_env.sh

demo: setup
	for variant in conventional armed; do \
		$(VPY) -m monai.bundle run --config_file $(BUNDLE)/configs/train.json --meta_file $(BUNDLE)/configs/metadata.json \
			--logging_file $(BUNDLE)/configs/logging.conf --bundle_root $(RUNS)/$$variant --variant $$variant || exit 1; \
	done
	$(VPY) -m monai_armed.report conventional=$(RUNS)/conventional/eval/metrics.json armed=$(RUNS)/armed/eval/metrics.json

test: setup
	$(VPY) -m ruff check monai_armed tests benchmarks
	$(VPY) -m pytest -q tests

clean:
	rm -rf runs
