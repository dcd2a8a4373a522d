# Two entry points do all setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORPUS ?= ../shared/corpus

VERL_VENV := .venv-verl
VERL_BIN := $(VERL_VENV)/bin
# veRL tests (thyme.integrations.verl) and the core's RL/agent/protocol tests in veRL's own environment
VERL_TESTS := tests/integrations/test_verl_agent_loop.py tests/test_protocol.py tests/agent/test_loop.py tests/agent/test_step.py tests/rollout/test_ats.py tests/train/test_grpo.py

.PHONY: venv demo test clean venv-verl test-verl

# constraints.txt: the exact versions tested together (pyproject.toml holds the ranges).
# The extras the test suite needs: eval, train, testing (dev servers), dev (pytest) and ray
# (--ray's test on a local instance; the wheel installs in ~10 s).
EXTRAS ?= dev,eval,train,testing,ray

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

clean:
	rm -rf $(VENV) $(VERL_VENV) demo-out
