"""The subset of `kustomize build` that k8s/ uses, so the tests need neither kustomize
nor kubectl: a kustomization's `resources` (files, or folders with a kustomization.yaml),
its `patches`, each a JSON6902 op list (from `path` or inline `patch`) applied to the
resources its `target` selects (group, version, kind, name), and its `images` (set on
every `containers`/`initContainers` entry at any depth, as kustomize does for custom
resources). Anything else in a kustomization is refused, so the manifests cannot drift
past what this renders."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KNOWN_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}


def render(folder: Path) -> list[dict]:
    """The documents `kustomize build folder` gives, in order."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"{folder}: kustomization keys this renderer does not implement: {sorted(unknown)}")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(f"{folder}: only JSON6902 patches (op lists) are implemented")
        targets = [doc for doc in docs if _selected(doc, patch["target"])]
        if not targets:
            raise ValueError(f"{folder}: patch target {patch['target']} matches nothing")
        for doc in targets:
            for op in ops:
                apply_op(doc, op)
    for image in kustomization.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    return docs


def image_name(ref: str) -> str:
    """`registry:5000/outrider:0.1.0` -> `registry:5000/outrider` (no tag, no digest)."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def _set_image(node, image: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c and image_name(c["image"]) == image["name"]:
                        ref = c["image"].split("@", 1)[0]
                        tag = ref.rsplit(":", 1)[1] if ":" in ref.rpartition("/")[2] else None
                        name, tag = image.get("newName", image["name"]), image.get("newTag", tag)
                        c["image"] = name + (f"@{image['digest']}" if "digest" in image else f":{tag}" if tag else "")
            _set_image(value, image)


def _selected(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    unknown = set(target) - set(have)
    if unknown:
        raise ValueError(f"patch target keys this renderer does not implement: {sorted(unknown)}")
    return all(have[key] == value for key, value in target.items())


def _tokens(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"not a JSON pointer: {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _walk(doc, tokens: list[str]):
    for token in tokens:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc


def apply_op(doc: dict, op: dict) -> None:
    """One RFC 6902 operation (add, remove, replace, test), in place."""
    *parent_path, last = _tokens(op["path"])
    parent = _walk(doc, parent_path)  # KeyError / IndexError: the path does not exist
    kind = op["op"]
    if kind == "test":
        if _get(parent, last) != op["value"]:
            raise AssertionError(f"test failed at {op['path']}: {_get(parent, last)!r} != {op['value']!r}")
    elif kind == "remove":
        _get(parent, last)
        del parent[int(last) if isinstance(parent, list) else last]
    elif kind == "replace":
        _get(parent, last)  # replace needs the target to exist
        parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
    elif kind == "add":
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), value)
        else:
            parent[last] = value
    else:
        raise ValueError(f"JSON6902 op this renderer does not implement: {kind}")


def _get(parent, token: str):
    return parent[int(token)] if isinstance(parent, list) else parent[token]


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc
