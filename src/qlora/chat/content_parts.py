"""Whether a chat template reads a message's content as a list of parts (vLLM's content format).

A client may send a message's content as several parts. vLLM hands them to the template in one of two forms,
chosen by reading the template: one that loops over a message's content (``{% for part in message['content'] %}``:
Llama 4, Gemma 3, Qwen2-VL, Mistral Small 3) gets the parts as a list of ``{"type": "text", "text": ...}``; any
other gets their texts joined with newlines, as a string. qlora renders by the same rule, so a prompt sent in parts
is the one vLLM builds from it. vLLM gives a content sent as a string to a template reading parts as one text part;
qlora does so, in training and inference alike, where the template never tests whether a content is a string
(LLaVA's, SmolVLM's, Idefics'): it would loop over the string's characters and drop the text. One that tests
renders a string itself (Gemma 4's system turn prints a content as is, a list as its Python repr).
"""

from __future__ import annotations

import functools

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

PART_SEPARATOR = "\n"  # between the texts of a content's parts, for a template that reads a string


def _source(node: nodes.Node) -> nodes.Node:
    """What an expression reads, under its filters, tests and slices (``messages[1:] | reverse`` reads
    ``messages``)."""
    while True:
        if isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:
            node = node.node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            node = node.node
        else:
            return node


def _is_name(node: nodes.Node, names: set[str]) -> bool:
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in names


def _is_content_of(node: nodes.Node, names: set[str]) -> bool:
    """Whether ``node`` is ``m['content']`` or ``m.content`` for a name ``m`` in ``names``."""
    if isinstance(node, nodes.Getattr):
        return node.attr == "content" and _is_name(node.node, names)
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content" and _is_name(node.node, names)
    return False


def _targets(node: nodes.Node) -> list[str]:
    if isinstance(node, nodes.Name):
        return [node.name]
    if isinstance(node, nodes.Tuple):
        return [n.name for n in node.items if isinstance(n, nodes.Name)]
    return []


@functools.lru_cache(maxsize=64)
def _parsed(template: str) -> nodes.Template | None:
    """The template's syntax tree; None for a template that is not valid Jinja."""
    try:
        return ImmutableSandboxedEnvironment(extensions=[loopcontrols, _Generation]).parse(template)
    except Exception:  # a template transformers cannot render either: it fails where it is rendered
        return None


@functools.lru_cache(maxsize=64)
def reads_parts(template: str) -> bool:
    """Whether ``template`` loops over a message's content: over ``m['content']`` (or ``m.content``) where ``m``
    is a loop variable over the messages (or over a variable set from them, ``loop_messages = messages[1:]``), or
    over a variable named ``content``. False for a template that is not valid Jinja."""
    tree = _parsed(template)
    if tree is None:
        return False
    lists = {"messages"}
    grew = True
    while grew:  # the names the messages are bound to, through any chain of assignments
        grew = False
        for assign in tree.find_all(nodes.Assign):
            if _is_name(_source(assign.node), lists):
                new = set(_targets(assign.target)) - lists
                lists |= new
                grew = grew or bool(new)
    loops = list(tree.find_all(nodes.For))
    items = {name for loop in loops if _is_name(_source(loop.iter), lists) for name in _targets(loop.target)}
    return any(_is_content_of(_source(loop.iter), items) or _is_name(loop.iter, {"content"}) for loop in loops)


@functools.lru_cache(maxsize=64)
def reads_only_parts(template: str) -> bool:
    """Whether ``template`` reads a content as parts (:func:`reads_parts`) and never tests one for a string
    (``message['content'] is string``, ``messages[0].content is not string``, ``content is string``): a string
    content is then given as one text part."""
    return reads_parts(template) and not any(test.name == "string" and _is_a_content(_source(test.node))
                                             for test in _parsed(template).find_all(nodes.Test))


def _is_a_content(node: nodes.Node) -> bool:
    """Whether ``node`` reads some message's content: ``x['content']``, ``x.content`` or a variable ``content``."""
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return _is_name(node, {"content"})


class _Generation(Extension):
    """Parses transformers' ``{% generation %}`` blocks (assistant masks), which only mark their body."""

    tags = {"generation"}

    def parse(self, parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)
