"""Reference for the differential test: the web UI's lark grammar for prompt editing and its
schedule logic (modules/prompt_parser.py), written out from its documented behaviour. lark's
Earley parser is far too slow for long prompts, which is why sdrt parses differently."""
import lark

GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
PARSER = lark.Lark(GRAMMAR)


def _flatten(x):
    if isinstance(x, str):
        yield x
    elif x is not None:
        for item in x:
            yield from _flatten(item)


def reference_schedule(prompt: str, steps: int):
    try:
        tree = PARSER.parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    boundaries = {steps}

    class Collect(lark.Visitor):
        def scheduled(self, t):
            s = t.children[-2]
            v = float(s)
            v = v * steps if "." in s else v
            t.children[-2] = min(steps, int(v))
            if t.children[-2] >= 1:
                boundaries.add(t.children[-2])

        def alternate(self, t):
            boundaries.update(range(1, steps + 1))

    Collect().visit(tree)

    def at(step):
        class AtStep(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after

            def alternate(self, args):
                args = ["" if not a else a for a in args]
                yield args[(step - 1) % len(args)]

            def start(self, args):
                return "".join(_flatten(args))

            def plain(self, args):
                yield args[0].value

            def __default__(self, data, children, meta):
                for child in children:
                    yield child
        return AtStep().transform(tree)

    return [(t, at(t)) for t in sorted(boundaries)]
