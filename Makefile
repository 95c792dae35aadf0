# One entry point for people and CI. `make test` is what CI runs.
CARGO ?= cargo
STACK := $(CARGO) run --quiet -p whist-test-support --bin stack --

# `make run PROFILE=release` runs the fleet from release binaries (bench-fleet does).
PROFILE ?= dev
BIN := $${CARGO_TARGET_DIR:-target}/$(if $(filter release,$(PROFILE)),release,debug)
# The scaling-service image the tests build and run.
TEST_IMAGE := whist/scaling-service:test

.PHONY: run stack session status image check-deploy test check lint fmt bench bench-dbclient bench-host bench-scaling bench-fleet engine postgres moto nextest clean

## run: the whole fleet on this machine: stack, scaling-service, host-service processes and their mandelboxes; Ctrl-C stops it all
run: engine postgres
	$(CARGO) build --workspace --bins --quiet --profile $(PROFILE)
	@$(BIN)/local-fleet $(FLEET_ARGS)

## session: play one client session against the running local fleet (assign, config, ports and key, end)
session:
	$(CARGO) run --quiet -p whist-client --bin whist -- session

## status: regions, hosts and mandelboxes by state of the running local fleet
status:
	$(CARGO) run --quiet -p whist-client --bin whist -- status

## stack: only the database and the GraphQL engine (no seed data), printing their URLs
stack: engine postgres
	$(STACK) up

## test: format and lint checks, then every test tier against one shared local stack
test: engine postgres moto check nextest
	@# One workspace build, so the stack binary shares the tests' features and nothing rebuilds;
	@# then the binaries alone as `make run` builds them (dev-dependencies unify other features
	@# into a test build), so the test that runs `make run` finds them built.
	$(CARGO) build --workspace --all-targets --quiet
	$(CARGO) build --workspace --bins --quiet
	@# The scaling-service image the image test runs (a static binary: its own build, done here
	@# rather than inside a test's time limit; quick when nothing changed).
	WHIST_IMAGE_PROFILE=dev bash scripts/build-scaling-image.sh $(TEST_IMAGE) >/dev/null
	bash scripts/check-deploy.sh
	$${CARGO_TARGET_DIR:-target}/debug/stack exec -- $(CARGO) nextest run --workspace --no-fail-fast

## check: formatting and clippy, warnings are errors
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: print every benchmark's figures (database client, host-service on Docker, scaling-service, local fleet)
bench: bench-dbclient bench-host bench-scaling bench-fleet

## bench-dbclient: stack start-up, round trips, claims/s, live-query latency
bench-dbclient: engine
	$(CARGO) run --release -p whist-dbclient --example dbclient_bench

## bench-host: zygote creation vs bare Docker, assignment latencies, resident memory
bench-host: engine
	$(CARGO) build --release -p host-service --bin host-service --example host_bench
	./target/release/examples/host_bench

## bench-scaling: assignments/s at 32 and 128 clients, decide() on 10,000 hosts, event → launch
bench-scaling: engine moto
	$(CARGO) run --release -p scaling-service --example decide_bench
	$(CARGO) run --release -p scaling-service --example scaling_bench

## postgres: make sure PostgreSQL 15 is installed (apt as root; otherwise says what to run)
postgres:
	@bash scripts/install-postgres.sh

## check-deploy: shellcheck, packer validate, systemd-analyze verify and compose config on deploy/
check-deploy:
	$(CARGO) build --quiet -p host-service --bin host-service
	bash scripts/check-deploy.sh

## image: the scaling-service container image (static release binary, CA bundle) as whist/scaling-service:local
image:
	bash scripts/build-scaling-image.sh whist/scaling-service:local

## bench-fleet: make run (release binaries) → first assignable mandelbox (3 cold starts); assign → json_transport over 200 sessions
bench-fleet: engine postgres
	$(CARGO) build --workspace --bins --quiet --release
	@# "Already built" includes the mandelbox image make run would otherwise build first.
	bash scripts/build-reference-mandelbox.sh >/dev/null 2>&1
	$(CARGO) run --quiet -p local-fleet --example fleet_bench

## engine: install the Hasura-dialect GraphQL engine once per machine (cached outside the repo)
engine:
	@bash scripts/install-postrust.sh >/dev/null

## moto: install moto's server (the local EC2 API for the scaling-service tests) once per machine
moto:
	@bash scripts/install-moto.sh >/dev/null

nextest:
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
