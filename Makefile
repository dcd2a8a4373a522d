# Two entry points do all setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORPUS ?= ../shared/corpus

.PHONY: venv demo test clean

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

clean:
	rm -rf $(VENV) demo-out
