# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data/ml-100k)
STAMP := $(VENV)/.installed

.PHONY: demo test install bench-quality proto clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel first: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/olrec demo --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The gRPC stubs are generated into the package (the proto path mirrors it)
# and committed: a job's working directory drops git-ignored files.
# tests/test_proto.py fails when they are stale.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iserve/proto --python_out=. --pyi_out=. --grpc_python_out=. \
		serve/proto/olrec/v1/recommender.proto

bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py --events $(DATA) --format ml100k

clean:
	rm -rf $(VENV) .venv-peers reports runs
