"""Each phase reads only its view (issue 17 item 1), checked on the source: a function whose config
parameter is typed with a View reads only that view's fields and attributes, and passes it on only
to functions typed with a view it contains by name (never the flat Hyperparameters)."""

import ast
import dataclasses
import inspect

import pytest

import train_gpt as tg

SOURCE = ast.parse(inspect.getsource(tg))
VIEWS = {n: v for n, v in vars(tg).items() if isinstance(v, type) and issubclass(v, tg.View) and v is not tg.View}
FUNCTIONS = {n.name: n for n in SOURCE.body if isinstance(n, ast.FunctionDef)}
CLASSES = {n.name: n for n in SOURCE.body if isinstance(n, ast.ClassDef)}
# What each phase of run() receives: its view, not the flat config.
PHASES = {"train": "TrainConfig", "calibrate": "CalibConfig", "serialize": "PackConfig",
          "evaluate_final": "EvalConfig", "ttt_evaluate": "TTTConfig", "lora_ttt_evaluate": "DocTTTConfig",
          "build_model": "ModelConfig", "quantize_state": "QuantSpec"}


def fields(view: str) -> set[str]:
    return {f.name for f in dataclasses.fields(VIEWS[view])}


def attributes(view: str) -> set[str]:
    """Fields, properties and methods: what code may read on the view."""
    return fields(view) | {a for a in dir(VIEWS[view]) if not a.startswith("__")}


def config_params(fn: ast.FunctionDef) -> dict[str, str]:
    """Parameter name -> the config type named in its annotation (a view or Hyperparameters)."""
    out = {}
    for a in fn.args.args + fn.args.kwonlyargs:
        nodes = list(ast.walk(a.annotation)) if a.annotation else []
        names = {n.id for n in nodes if isinstance(n, ast.Name)}
        names |= {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        hit = [n for n in names if n in VIEWS or n == "Hyperparameters"]
        if hit:
            out[a.arg] = hit[0]
    return out


def callee_param(call: ast.Call, arg: ast.expr) -> tuple[str, str | None] | None:
    """(callee name, the config type of the parameter `arg` lands on) for a call of a module-level
    function or class; None when the callee is not one (a lambda, a method of an object)."""
    name = call.func.id if isinstance(call.func, ast.Name) else None
    if name in CLASSES:
        fn, skip = method(name, "__init__"), 1
    elif isinstance(call.func, ast.Attribute):  # obj.m(...): the one class of this module with a method m
        name = call.func.attr
        owners = [c for c in CLASSES if method(c, name)]
        fn, skip = (method(owners[0], name), 1) if len(owners) == 1 else (None, 0)
    else:
        fn, skip = FUNCTIONS.get(name), 0
    if fn is None:
        return None
    params = [a.arg for a in fn.args.args][skip:]
    target = next((k.arg for k in call.keywords if k.value is arg), None)
    if target is None:
        target = params[call.args.index(arg)]
    return name, config_params(fn).get(target)


def method(cls: str, name: str) -> ast.FunctionDef | None:
    return next((n for n in CLASSES[cls].body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def stored(init: ast.FunctionDef, p: str) -> list[str]:
    """self.<attr> that __init__ sets to the parameter p (self.cfg = cfg, or in a tuple assignment)."""
    out = []
    for node in ast.walk(init):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) and \
                    isinstance(node.value, ast.Tuple) else [(target, node.value)]
                out += [ast.unparse(t) for t, v in pairs if through(v, p) and ast.unparse(t).startswith("self.")]
    return out


def view_functions():
    """(qualified name, function node, parameter, view, the expression reads are made through)."""
    for name, fn in FUNCTIONS.items():
        for p, view in config_params(fn).items():
            if view in VIEWS:
                yield name, fn, p, view
    for cname, cls in CLASSES.items():
        methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
        for m in methods:
            for p, view in config_params(m).items():
                if view in VIEWS:
                    yield f"{cname}.{m.name}", m, p, view
                    for attr in stored(m, p) if m.name == "__init__" else ():  # self.h = h: read as self.h
                        for other in methods:
                            yield f"{cname}.{other.name}", other, attr, view


def through(node: ast.AST, p: str) -> bool:
    return ast.unparse(node) == p


def problems() -> list[str]:
    found = []
    for qual, fn, p, view in view_functions():
        allowed, mine = attributes(view), fields(view)
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and through(node.value, p) and node.attr not in allowed:
                found.append(f"{qual} reads {p}.{node.attr}, not in {view}")
            if not isinstance(node, ast.Call):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if not through(arg, p):
                    continue
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr == "of" and isinstance(f.value, ast.Name):
                    if f.value.id in VIEWS and not fields(f.value.id) <= mine:
                        found.append(f"{qual} builds {f.value.id} from {view}: missing "
                                     f"{sorted(fields(f.value.id) - mine)}")
                    continue
                if ast.unparse(f) in ("dataclasses.replace", "getattr"):
                    continue
                callee = callee_param(node, arg)
                if callee is None:
                    found.append(f"{qual} passes {p} ({view}) to {ast.unparse(f)}, which is not a typed function")
                elif callee[1] is None or callee[1] == "Hyperparameters":
                    found.append(f"{qual} passes {p} ({view}) to {callee[0]}, typed {callee[1]}")
                elif not fields(callee[1]) <= mine:
                    found.append(f"{qual} passes {view} to {callee[0]} ({callee[1]}): missing "
                                 f"{sorted(fields(callee[1]) - mine)}")
    return found


def test_a_function_typed_with_a_view_reads_and_passes_only_that_view():
    assert problems() == []


def test_the_check_sees_a_read_outside_the_view_and_a_pass_to_the_flat_config():
    global FUNCTIONS
    bad = ast.parse("def f(h: TrainConfig, rt):\n    return h.eval_stride + g(h)\n"
                    "def g(h: Hyperparameters):\n    return 0\n").body
    saved = FUNCTIONS
    FUNCTIONS = {**saved, "f": bad[0], "g": bad[1]}
    try:
        found = [x for x in problems() if x.startswith("f ")]
    finally:
        FUNCTIONS = saved
    assert found == ["f reads h.eval_stride, not in TrainConfig", "f passes h (TrainConfig) to g, typed Hyperparameters"]


@pytest.mark.parametrize("phase,view", sorted(PHASES.items()))
def test_each_phase_of_the_run_takes_its_view(phase, view):
    assert view in config_params(FUNCTIONS[phase]).values()


def test_every_field_of_a_view_is_read_by_a_function_typed_with_it_or_a_view_inside_it():
    read: dict[str, set[str]] = {v: set() for v in VIEWS}
    for _, fn, p, view in view_functions():
        read[view] |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and through(n.value, p)}
    borrowed = {}  # a view's properties and methods (its own or Hyperparameters') read the fields they use
    for cls in ["Hyperparameters", *VIEWS]:
        for node in CLASSES[cls].body:
            if isinstance(node, ast.FunctionDef):
                borrowed.setdefault(node.name, set()).update(
                    n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and through(n.value, "self"))
    for view in VIEWS:
        used = set()
        for other in VIEWS:
            if fields(other) <= fields(view):
                used |= read[other]
        used |= {f for a in list(used) for f in borrowed.get(a, ())}
        assert fields(view) - used == set(), view


# The run's setup before the phases: the log and its header, the tokenizer and its checks.
SETUP = {"setup_logging", "log_run_header", "load_tokenizer", "check_caseops_tokenizer", "resolve_bos_id"}


def test_only_the_setup_the_report_and_the_drivers_take_the_flat_config():
    lines = inspect.getsource(tg).splitlines()
    report = lines.index("# Report") + 1  # the report and the drivers follow, to the end of the file
    flat = {n for n, fn in FUNCTIONS.items() if "Hyperparameters" in config_params(fn).values()}
    assert flat and {n for n in flat if FUNCTIONS[n].lineno < report} == SETUP
