"""Problem types (RFC 9457) and the bearer check, without a server: every code raised anywhere in
``serving/`` is documented in serving/problems.py (found by reading the source, wrappers included), and
the token check answers as RFC 6750 says."""

import ast
from pathlib import Path

import pytest

from serving import auth
from serving.errors import FRAMEWORK_CODES, Problem
from serving.problems import PROBLEMS, page

SERVING = Path(__file__).resolve().parents[2] / "serving"


def _strings(node: ast.AST) -> set[str]:
    """The codes an expression can evaluate to: a literal, either branch of ``a if c else b``, the default
    of ``mapping.get(key, default)`` (the mappings themselves are checked whole)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    if isinstance(node, ast.Call) and _callee(node) == "get" and len(node.args) == 2:
        return _strings(node.args[1])
    return set()


def _code_arg(call: ast.Call, index: int, name: str) -> ast.AST | None:
    if len(call.args) > index and not isinstance(call.args[index], ast.Starred):
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == name), None)


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _assigned(fn: ast.AST, name: str) -> set[str]:
    """String constants assigned to ``name`` inside ``fn`` (``code = X.get(..., "default")``: the
    default; the dictionaries a ``.get`` reads are checked as wholes below)."""
    out = set()
    for n in ast.walk(fn):
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and n.value is not None:
                out |= _strings(n.value)
    return out


def raised_codes() -> tuple[set[str], list[str]]:
    """Every problem code the source can raise: literal codes given to ``Problem`` and to any function
    that passes one of its parameters on as ``Problem``'s code (``archive.bad``), and codes assigned to a
    variable that is then passed. Returns ``(codes, calls that could not be resolved)``."""
    trees = {p: ast.parse(p.read_text()) for p in sorted(SERVING.glob("*.py"))}
    builders = {"Problem": (1, "code")}  # callee -> (position, keyword) of its code argument
    for tree in trees.values():
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            params = [a.arg for a in fn.args.args]
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and _callee(n) == "Problem"):
                arg = _code_arg(call, 1, "code")
                if isinstance(arg, ast.Name) and arg.id in params and fn.name != "_rebuild":
                    builders[fn.name] = (params.index(arg.id), arg.id)
    codes, unresolved = set(), []
    for path, tree in trees.items():
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and _callee(n) in builders):
                if fn.name in builders or fn.name == "_rebuild":
                    continue  # the wrapper's own forwarding call
                index, kw = builders[_callee(call)]
                arg = _code_arg(call, index, kw)
                found = _assigned(fn, arg.id) if isinstance(arg, ast.Name) else _strings(arg) if arg else set()
                if not found:
                    unresolved.append(f"{path.name}:{call.lineno}")
                codes |= found
    return codes, unresolved


def test_every_code_raised_in_serving_is_documented():
    from serving.api import FIELD_CODES

    codes, unresolved = raised_codes()
    assert not unresolved, f"problem codes the test cannot read (give a literal code): {unresolved}"
    codes |= set(FRAMEWORK_CODES.values()) | set(FIELD_CODES.values())
    assert len(codes) > 40 and {"too-large", "path-traversal", "bad-cursor", "unauthorized"} <= codes
    missing = sorted(codes - set(PROBLEMS))
    assert not missing, f"add these to serving/problems.py: {missing}"


def test_a_problem_points_at_its_own_page():
    body = Problem(404, "unknown-job", "no job 'x'").body("rid")
    assert body["type"] == "/problems/unknown-job" and body["title"] == "Unknown job"
    assert "<code>unknown-job</code>" in page("unknown-job")


@pytest.mark.parametrize("sent", [None, "", "Bearer", "Bearer wrong", "Basic dG9rZW4=", "Bearer tokenX", "token"])
def test_a_wrong_or_missing_token_is_a_401_with_a_bearer_challenge(sent):
    with pytest.raises(Problem) as e:
        auth.check("token", sent)
    assert e.value.status == 401 and e.value.code == "unauthorized"
    challenge = e.value.headers()["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="mergeserve"')
    assert ('error="invalid_token"' in challenge) == (sent in ("Bearer wrong", "Bearer tokenX"))


def test_the_right_token_passes_and_no_token_means_open():
    auth.check("token", "Bearer token")
    auth.check("token", "bearer  token ")  # the scheme is case-insensitive
    auth.check(None, None)
    auth.check("", "anything")


def test_the_compare_is_constant_time(monkeypatch):
    """The token is compared by hmac.compare_digest over equal-length digests, never by ``==``."""
    seen = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: seen.append((len(a), len(b))) or real(a, b))
    auth.check("a-long-server-token", "Bearer a-long-server-token")
    with pytest.raises(Problem):
        auth.check("a-long-server-token", "Bearer y")
    assert seen == [(32, 32), (32, 32)]


def test_openapi_marks_exactly_the_routes_that_check_the_token():
    """The Authorize button of /docs applies to every route that calls ``_auth``, and to no other."""
    import inspect

    from serving.api import api

    spec = api.openapi()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    checks, declared = set(), set()

    def flat(routes: list) -> list:  # this FastAPI wraps the app's own router in an included one
        return [x for r in routes for x in (flat(r.original_router.routes) if hasattr(r, "original_router") else [r])]

    for route in flat(api.routes):
        if getattr(route, "include_in_schema", False) and hasattr(route, "endpoint"):
            for method in route.methods - {"HEAD"}:
                if "self._auth(request)" in inspect.getsource(route.endpoint):
                    checks.add((method, route.path))
                if spec["paths"][route.path][method.lower()].get("security"):
                    declared.add((method, route.path))
    assert checks == declared and ("POST", "/v1/domains") in checks and len(checks) >= 3, (checks, declared)
