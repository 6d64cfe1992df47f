# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap what they use:
#   .venv        the video environment: the core on the current torch / transformers, Ray, lmms-eval (make setup)
#   .venv-robot  the robot environment: lerobot's bounds, lerobot and the simulators (make setup-robot)
# (requirements/*.lock; the dependencies are cached once per machine, each clone layers its own code on them)
.PHONY: demo test test-video test-robot test-gpu bench-gpu bench bench-fidelity bench-stream bench-vla bench-vla-pi0 bench-vla-fidelity bench-encoder bench-vla-encoder bench-models bench-methods bench-batch setup setup-robot lint

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

setup:
	@bash scripts/bootstrap.sh video

setup-robot:
	@bash scripts/bootstrap.sh robot

demo: setup
	.venv/bin/streamprune summarize sample:bigbuckbunny --model tiny --retain 0.1 --save-viz out/demo_holitom.png

# The suite in both environments: policy / simulator tests in the robot one, lmms-eval's in the video one,
# everything else in both (tests/conftest.py routes modules). It runs on the CPU (fp32) even where a GPU is
# visible; tests/gpu is `make test-gpu`. robosuite reads CUDA_VISIBLE_DEVICES to pick its EGL device, so that one
# is named explicitly.
test: test-robot test-video

test-robot: setup-robot
	STREAMPRUNE_TEST_ENV=robot CUDA_VISIBLE_DEVICES= MUJOCO_EGL_DEVICE_ID=0 .venv-robot/bin/python -m pytest -q

test-video: setup
	STREAMPRUNE_TEST_ENV=video CUDA_VISIBLE_DEVICES= .venv/bin/python -m pytest -q

# on a machine with a CUDA GPU: the device checks on CUDA, every model family, compiled decode
test-gpu: setup
	.venv/bin/python -m pytest -q tests/gpu

# on a machine with a CUDA GPU: TTFT / reduce / decode at 7B dimensions, results in benchmarks/results/gpu/
bench-gpu: setup
	.venv/bin/python -m benchmarks.bench_gpu

lint: setup
	.venv/bin/ruff check streamprune policies envs tests benchmarks

bench: setup
	.venv/bin/python benchmarks/bench_summarize.py

bench-stream: setup
	.venv/bin/python benchmarks/bench_stream.py
	.venv/bin/python benchmarks/bench_stream.py --model tiny-qwen2.5-vl --minutes 1 10 30 --streams skip still

bench-vla: setup-robot
	.venv-robot/bin/python -m benchmarks.bench_vla

bench-vla-pi0: setup-robot
	.venv-robot/bin/python -m benchmarks.bench_vla_pi0

bench-vla-fidelity: setup-robot
	.venv-robot/bin/python -m benchmarks.bench_vla_fidelity --policy smolvla
	.venv-robot/bin/python -m benchmarks.bench_vla_fidelity --policy pi0 --episodes 1 --chunks 9

bench-encoder: setup
	.venv/bin/python -m benchmarks.bench_encoder

bench-vla-encoder: setup-robot
	MUJOCO_GL=egl .venv-robot/bin/python -m benchmarks.bench_vla_encoder --env pusht

bench-batch: setup
	.venv/bin/python -m benchmarks.bench_batch
	.venv/bin/python -m benchmarks.bench_batch --copies 32

bench-methods: setup
	.venv/bin/python -m benchmarks.bench_methods

bench-models: setup
	.venv/bin/python -m benchmarks.bench_models --model qwen2.5-vl-3b --max-pixels 200704
	.venv/bin/python -m benchmarks.bench_models --model qwen2.5-vl-3b --max-pixels 200704 --retain 0.1 --videos bigbuckbunny bikes carphone_pristine --encoder reuse+tome:0.7 reuse+tome:0.8 --merge-schedule decreasing --vision-repeats 2 --out benchmarks/results/models_qwen2.5-vl-3b_encoder.json
	.venv/bin/python -m benchmarks.bench_models --model smolvlm2-500m --repeats 3
	.venv/bin/python -m benchmarks.bench_models --model smolvlm2-500m --videos bigbuckbunny carphone_distorted --encoder reuse tome:0.9 reuse+tome:0.9 --out benchmarks/results/models_smolvlm2-500m_encoder.json
	.venv/bin/python -m benchmarks.bench_models --model tiny-qwen2.5-vl --steps 16 --videos bigbuckbunny bikes carphone_distorted carphone_pristine
	.venv/bin/python -m benchmarks.bench_models --model tiny-qwen3-vl --steps 16 --videos bigbuckbunny bikes carphone_distorted carphone_pristine

bench-fidelity: setup
	.venv/bin/python benchmarks/bench_fidelity.py
