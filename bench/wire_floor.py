"""Upper bound on bench/wire.py's ratio: the work no codec can skip, against the same memcpy.

Whatever the codec, `decode_tree` must return a `ReasoningTree` whose `nodes` are `Node`
objects holding int32 / float32 numpy arrays (design §2), must look at every token id and every
log-prob once (vocabulary bound, finiteness: design §5.2), and `encode_tree` must write the
frame's bytes at least once. This bench times only that -- header parsing, meta, schema checks,
the per-node rules and gathering the nodes cost nothing here -- for the tree of bench/wire.py:

  objects = 28 array views + 14 Node objects + 1 ReasoningTree, from already-decoded flat arrays
  scan    = one pass over the token ids (max) and the log-probs (finite)
  copy    = np.copyto of the frame (encode's one unavoidable write); also the baseline
  floor   = objects + scan + copy;  max_ratio = copy / floor

Each figure is the fastest of --repeats batches (the most generous figure for the codec's side;
the memcpy gets the same treatment).

twice: built in Python (what common/wire.py does) and, where a C compiler and the Python and
numpy headers are present, by a small C extension compiled into a temp folder at run time
(views by PyArray_NewFromDescr, nodes by object.__new__ + slot stores, a branch-free scan).
`ratio` is the larger max_ratio: no implementation of this API can beat it on this machine.

    python bench/wire_floor.py [--json] [--iters 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wire import TARGET, VOCAB, _seconds_per_call, realistic_tree  # noqa: E402

from common.tree import Node, ReasoningTree  # noqa: E402
from common.wire import decode_tree, encode_tree  # noqa: E402

_C_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stdint.h>

static PyObject *k_parent, *k_tok, *k_lp, *k_ver, *k_fin, *k_rew;

static PyObject *view(PyObject *base, int type, char *data, npy_intp n) {
    PyObject *a = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(type), 1, &n, NULL, data, 0, NULL);
    if (a == NULL) return NULL;
    Py_INCREF(base);
    if (PyArray_SetBaseObject((PyArrayObject *)a, base) < 0) { Py_DECREF(a); return NULL; }
    return a;
}

/* build(new, cls, tokens, logprobs, ends, parents, versions, finish, rewards) -> [Node] */
static PyObject *build(PyObject *self, PyObject *args) {
    PyObject *new_fn, *cls, *tok, *lp, *ends, *parents, *versions, *finish, *rewards;
    if (!PyArg_ParseTuple(args, "OOO!O!O!O!O!O!O!", &new_fn, &cls, &PyArray_Type, &tok, &PyArray_Type, &lp,
                          &PyList_Type, &ends, &PyList_Type, &parents, &PyList_Type, &versions,
                          &PyList_Type, &finish, &PyList_Type, &rewards))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ends);
    char *tb = PyArray_BYTES((PyArrayObject *)tok), *lb = PyArray_BYTES((PyArrayObject *)lp);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    npy_intp lo = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        npy_intp hi = PyLong_AsSsize_t(PyList_GET_ITEM(ends, i));
        if (hi == -1 && PyErr_Occurred()) goto fail;
        PyObject *a = view(tok, NPY_INT32, tb + 4 * lo, hi - lo);
        PyObject *b = a ? view(lp, NPY_FLOAT32, lb + 4 * lo, hi - lo) : NULL;
        PyObject *node = b ? PyObject_CallOneArg(new_fn, cls) : NULL;
        int bad = node == NULL
            || PyObject_SetAttr(node, k_parent, PyList_GET_ITEM(parents, i)) < 0
            || PyObject_SetAttr(node, k_tok, a) < 0 || PyObject_SetAttr(node, k_lp, b) < 0
            || PyObject_SetAttr(node, k_ver, PyList_GET_ITEM(versions, i)) < 0
            || PyObject_SetAttr(node, k_fin, PyList_GET_ITEM(finish, i)) < 0
            || PyObject_SetAttr(node, k_rew, PyList_GET_ITEM(rewards, i)) < 0;
        Py_XDECREF(a);
        Py_XDECREF(b);
        if (bad) { Py_XDECREF(node); goto fail; }
        PyList_SET_ITEM(out, i, node);
        lo = hi;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* scan(tokens int32, logprobs float32, vocab) -> all ids in [0, vocab) and all log-probs finite */
static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *tok, *lp;
    unsigned int vocab;
    if (!PyArg_ParseTuple(args, "O!O!I", &PyArray_Type, &tok, &PyArray_Type, &lp, &vocab)) return NULL;
    const uint32_t *t = (const uint32_t *)PyArray_DATA((PyArrayObject *)tok);
    const uint32_t *f = (const uint32_t *)PyArray_DATA((PyArrayObject *)lp);
    npy_intp nt = PyArray_SIZE((PyArrayObject *)tok), nf = PyArray_SIZE((PyArrayObject *)lp);
    uint32_t mx = 0, inf = 0;
    for (npy_intp i = 0; i < nt; i++) mx = t[i] > mx ? t[i] : mx;  /* negative ids wrap above 2**31 */
    for (npy_intp i = 0; i < nf; i++) inf |= (f[i] & 0x7f800000u) == 0x7f800000u;  /* NaN/inf exponent */
    return PyBool_FromLong(mx < vocab && !inf);
}

static PyMethodDef methods[] = {{"build", build, METH_VARARGS, NULL}, {"scan", scan, METH_VARARGS, NULL}, {NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire_floor", NULL, -1, methods};

PyMODINIT_FUNC PyInit__wire_floor(void) {
    import_array();
    k_parent = PyUnicode_InternFromString("parent");
    k_tok = PyUnicode_InternFromString("token_ids");
    k_lp = PyUnicode_InternFromString("logprobs");
    k_ver = PyUnicode_InternFromString("version");
    k_fin = PyUnicode_InternFromString("finish");
    k_rew = PyUnicode_InternFromString("reward");
    return PyModule_Create(&module);
}
"""


def _best_seconds(fn, iters: int, repeats: int) -> float:
    """Fastest of `repeats` timed batches of `iters` calls: the generous figure, for a bound."""
    return _seconds_per_call(fn, iters, repeats, pick=min)


def compile_c(workdir: Path):
    """The C module, or (None, why) when it cannot be built here."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    target = workdir / ("_wire_floor" + sysconfig.get_config_var("EXT_SUFFIX"))
    src = workdir / "_wire_floor.c"
    src.write_text(_C_SOURCE)
    cmd = [*cc, "-O3", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", f"-I{np.get_include()}",
           str(src), "-o", str(target)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{cmd[0]}: {e}"
    if proc.returncode != 0:
        return None, f"{cmd[0]} failed: {proc.stderr.strip()[-300:]}"
    spec = importlib.util.spec_from_file_location("_wire_floor", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


def run(iters: int, repeats: int, workdir: Path) -> dict:
    tree = realistic_tree()
    buf = encode_tree(tree)
    decoded = decode_tree(buf, vocab_size=VOCAB)
    # the flat token / log-prob arrays decode maps (read-only views over the frame) and slices
    tokens, logprobs = decoded.nodes[0].token_ids.base, decoded.nodes[0].logprobs.base
    assert tokens.shape[0] == logprobs.shape[0] == tree.num_tokens(), "decode no longer slices one flat view"
    ends = np.cumsum([len(n) for n in tree.nodes]).tolist()
    parents = [n.parent for n in tree.nodes]
    versions = [n.version for n in tree.nodes]
    finish = [n.finish for n in tree.nodes]
    rewards = [n.reward for n in tree.nodes]
    prompt = tree.prompt_token_ids
    src = np.frombuffer(buf, dtype=np.uint8)
    dst = np.empty_like(src)
    u32 = np.dtype(np.uint32)

    def tree_of(nodes: list) -> ReasoningTree:
        return ReasoningTree(tree_id=tree.tree_id, prompt_id=tree.prompt_id, actor_id=tree.actor_id,
                             prompt_token_ids=prompt, nodes=nodes, meta=tree.meta)

    def objects_py() -> ReasoningTree:
        trusted, nodes, lo = Node.trusted, [], 0
        for hi, p, v, f, r in zip(ends, parents, versions, finish, rewards, strict=True):
            nodes.append(trusted(p, tokens[lo:hi], logprobs[lo:hi], v, f, r))
            lo = hi
        return tree_of(nodes)

    def scan_py() -> bool:
        return bool(np.maximum.reduce(tokens.view(u32)) < VOCAB) and bool(np.isfinite(np.add.reduce(logprobs)))

    built = objects_py()
    assert all(np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.logprobs, b.logprobs)
               for a, b in zip(built.nodes, tree.nodes, strict=True)) and scan_py()
    copy_s = _best_seconds(lambda: np.copyto(dst, src), iters * 5, repeats)
    r: dict = {"bytes_per_tree": len(buf), "memcpy_us": copy_s * 1e6, "memcpy_gb_per_s": len(buf) / copy_s / 1e9}
    obj_s = _best_seconds(objects_py, iters, repeats)
    scan_s = _best_seconds(scan_py, iters, repeats)
    r.update(py_objects_us=obj_s * 1e6, py_scan_us=scan_s * 1e6, py_floor_us=(obj_s + scan_s + copy_s) * 1e6,
             py_max_ratio=copy_s / (obj_s + scan_s + copy_s))
    mod, why = compile_c(workdir)
    if mod is None:
        r.update(c_objects_us=None, c_scan_us=None, c_floor_us=None, c_max_ratio=None, c_unavailable=why)
    else:
        new = object.__new__

        def objects_c() -> ReasoningTree:
            return tree_of(mod.build(new, Node, tokens, logprobs, ends, parents, versions, finish, rewards))

        def scan_c() -> bool:
            return mod.scan(tokens, logprobs, VOCAB)

        built = objects_c()
        assert all(np.array_equal(a.token_ids, b.token_ids) and a.parent == b.parent and a.reward == b.reward
                   for a, b in zip(built.nodes, tree.nodes, strict=True)) and scan_c()
        obj_s = _best_seconds(objects_c, iters, repeats)
        scan_s = _best_seconds(scan_c, iters, repeats)
        r.update(c_objects_us=obj_s * 1e6, c_scan_us=scan_s * 1e6, c_floor_us=(obj_s + scan_s + copy_s) * 1e6,
                 c_max_ratio=copy_s / (obj_s + scan_s + copy_s))
    r["ratio"] = max(x for x in (r["py_max_ratio"], r["c_max_ratio"]) if x is not None)
    r["target"] = TARGET
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="treerpo-wire-floor-") as tmp:
        r = run(args.iters, args.repeats, Path(tmp))
    print(f"tree: {r['bytes_per_tree']} bytes on the wire; "
          f"memcpy {r['memcpy_us']:.2f} us ({r['memcpy_gb_per_s']:.1f} GB/s)")
    print(f"{'built by':<10}{'objects_us':>12}{'scan_us':>10}{'floor_us':>10}{'max_ratio':>11}")
    for who in ("py", "c"):
        if r[f"{who}_floor_us"] is None:
            print(f"{who:<10}{'unavailable: ' + r['c_unavailable']}")
            continue
        print(f"{who:<10}{r[who + '_objects_us']:>12.2f}{r[who + '_scan_us']:>10.2f}{r[who + '_floor_us']:>10.2f}"
              f"{r[who + '_max_ratio']:>11.3f}")
    print(f"upper bound on bench/wire.py's ratio: {r['ratio']:.3f} (target {r['target']})")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
