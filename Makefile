# Benchmarks (issue 5).  `make bench` runs pop3d against Dovecot (and Twisted, stock and
# tuned, when bench/.venv exists) and prints the table (~18 minutes here); `make bench-quick`
# is the short version (4.5 minutes).  BENCH_ARGS="--baseline pre14=87b09bf" adds pop3d as
# of that revision as one more server (bench/README.md: recipes and run times).
PY ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-venv bench-dovecot

bench: bench-dovecot
	$(PY) bench/run.py $(BENCH_SERVERS) $(BENCH_ARGS)

bench-quick: bench-dovecot
	$(PY) bench/run.py --quick $(BENCH_SERVERS) $(BENCH_ARGS)

# the load generator's uvloop and the Twisted peer live in their own venv, so that
# pop3d's own environment stays as its users have it
bench-venv:
	test -x bench/.venv/bin/python || python3 -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q uvloop zlib-ng twisted argon2-cffi

bench-dovecot:
	@command -v dovecot >/dev/null || bash scripts/setup.sh

comma := ,
BENCH_SERVERS = $(if $(wildcard bench/.venv/bin/twistd),--servers=pop3d$(comma)dovecot$(comma)twisted$(comma)twisted-tuned)

# The no-loss soak (issue 15): SOAK_MINUTES per store (default 10), on Maildir then mbox;
# SOAK_ARGS="--seed N" reruns a seed.  `make soak-ci` is the CI length (tests/soak).
SOAK_MINUTES ?= 10
SOAK_STORES ?= maildir mbox
SOAK_ARGS ?=

.PHONY: soak soak-ci
soak:
	$(PY) -m tests.soak.run --minutes $(SOAK_MINUTES) $(foreach s,$(SOAK_STORES),--store $(s)) $(SOAK_ARGS)

soak-ci:
	$(PY) -bb -m pytest -q -p no:randomly tests/soak

# Coverage-guided fuzzing (issue 15): every target for FUZZ_SECONDS (default 300) with
# atheris; findings go to .fuzz/artifacts/.  `make fuzz-ci` is the CI run (tests/fuzz).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?=

.PHONY: fuzz fuzz-ci
fuzz:
	$(PY) -m tests.fuzz.run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-ci:
	$(PY) -bb -m pytest -q -p no:randomly tests/fuzz
