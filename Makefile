# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data/ml-100k)
STAMP := $(VENV)/.installed
# moto's S3 server, which tests/test_log_s3.py runs the log against, in a venv of its own.
S3_STAMP := .venv-s3/.installed

.PHONY: demo test install bench-quality proto clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel first: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serve]'
	touch $(STAMP)

$(S3_STAMP): constraints-s3.txt
	test -x .venv-s3/bin/python || $(PY) -m venv .venv-s3
	.venv-s3/bin/pip install -q -r constraints-s3.txt
	touch $(S3_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/olrec demo --data $(DATA)

test: $(STAMP) $(S3_STAMP)
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
	rm -rf $(VENV) .venv-peers .venv-s3 reports runs

# The olrec image every k8s/ manifest runs. Its name is set once, in k8s/base/kustomization.yaml
# (images: newName and newTag); tests/test_k8s.py checks that this target tags that name.
# For the gpu overlay: make image TORCH=cuda (a CUDA build of torch; the default is the CPU build).
IMAGE = $(shell awk '/^[a-zA-Z]/ {s = ($$1 == "images:")} s && $$1 == "newName:" {n = $$2} s && $$1 == "newTag:" {t = $$2} END {gsub(/"/, "", t); print n ":" t}' k8s/base/kustomization.yaml)
TORCH ?= cpu

.PHONY: image
image:
	docker build -t $(IMAGE) --build-arg TORCH=$(TORCH) -f k8s/Dockerfile .
