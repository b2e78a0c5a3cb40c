# Quick start: `make demo` (set up; generate multi-site MRI, train and evaluate a conventional CNN and ARMED, print the
# seen/unseen-site AUROC), `make spirals` (the same for the paper's toy spirals) and `make test`.
VPY := .venv/bin/python
BUNDLE := bundles/armed_spirals
RUNS := runs/spirals

.PHONY: setup demo spirals test clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(VPY) -m monai_armed.quickstart --root runs/mri

spirals: setup
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
