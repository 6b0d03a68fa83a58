"""From preprocessed MSL to a C++ translation unit the shim headers can compile.

The driver runs the C++ preprocessor first (with an empty <metal_stdlib>), so this module sees
the kernel source with the user's macros expanded and Metal's keywords intact. It then

- rejects what the emulator cannot run (simdgroup_matrix, textures, function constants, ...)
  with a message naming the construct and its .metal line;
- gives unsuffixed floating literals an `f` (in MSL `1.0` is a float, in C++ a double) and turns
  `1.0h` into a half;
- finds the kernels: `kernel`/`[[kernel]]` functions, and template kernels instantiated with
  `template [[host_name("name")]] [[kernel]] ...`, with the binding of every parameter;
- rewrites `threadgroup T x[N];` in a function body into per-threadgroup storage (as a plain
  local it would silently be private to each thread);
- removes Metal's attributes, and appends the glue that registers each kernel.

Every edit keeps the number of lines, so compiler messages and the runtime's error messages
point at the right .metal line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._errors import MetalSimCompileError

# Roles: the values of enum ms_role in include/metalsim/abi.h.
ROLE_BUFFER = 1
ROLE_THREADGROUP = 2
BUILTINS = {
    "thread_position_in_grid": 16,
    "thread_position_in_threadgroup": 17,
    "threadgroup_position_in_grid": 18,
    "threads_per_threadgroup": 19,
    "threadgroups_per_grid": 20,
    "thread_index_in_threadgroup": 21,
    "simdgroup_index_in_threadgroup": 22,
    "thread_index_in_simdgroup": 23,
    "simdgroups_per_threadgroup": 24,
    "threads_per_simdgroup": 25,
    "thread_execution_width": 25,
    "grid_size": 26,
    "threads_per_grid": 26,
    "dispatch_threads_per_threadgroup": 27,
    "quadgroup_index_in_threadgroup": 28,
    "thread_index_in_quadgroup": 29,
    "quadgroups_per_threadgroup": 30,
    "grid_origin": 31,
}

_UNSUPPORTED = {
    "simdgroup_matrix": "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    "simdgroup_load": "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    "simdgroup_store": "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    "simdgroup_multiply": "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    "simdgroup_multiply_accumulate": "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    "make_filled_simdgroup_matrix": "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    "sampler": "textures and samplers are not emulated",
    "imageblock": "imageblocks are not emulated",
    "is_function_constant_defined": "function constants are not supported: use #define and "
    "metalsim.compile(path, defines={...})",
    "array_ref": "array_ref is not supported",
    "visible_function_table": "function tables are not supported",
    "intersection_function_table": "ray tracing is not supported",
    "acceleration_structure": "ray tracing is not supported",
    "intersector": "ray tracing is not supported",
    "vertex": "only compute kernels run in metalsim",
    "fragment": "only compute kernels run in metalsim",
}
_UNSUPPORTED_PATTERNS = [
    (
        re.compile(r"simdgroup_(float|half|bfloat)\d+x\d+"),
        "simdgroup_matrix is not emulated (its lane layout is hardware-defined)",
    ),
    (
        re.compile(r"(texture(1d|2d|3d|cube|_buffer)\w*|depth(2d|cube)\w*)"),
        "textures and samplers are not emulated",
    ),
    (
        re.compile(
            r"quad_(sum|product|min|max|and|or|xor|shuffle\w*|broadcast\w*|ballot|all|any"
            r"|prefix_\w+|is_first|active_threads_mask)"
        ),
        "quad-group functions are not emulated",
    ),
]
_UNSUPPORTED_ATTRIBUTES = {
    "function_constant": "function constants are not supported: use #define and "
    "metalsim.compile(path, defines={...})",
    "texture": "textures are not emulated",
    "sampler": "samplers are not emulated",
    "stage_in": "only compute kernels run in metalsim",
    "visible": "visible functions are not supported",
    "stitchable": "stitchable functions are not supported",
    "imageblock_data": "imageblocks are not emulated",
    "indirect_buffer": "indirect command buffers are not supported",
}
# Attributes C++ itself knows; every other [[...]] is Metal's and is removed.
_STANDARD_ATTRIBUTES = {
    "noreturn",
    "carries_dependency",
    "deprecated",
    "fallthrough",
    "nodiscard",
    "maybe_unused",
    "likely",
    "unlikely",
    "no_unique_address",
}

_TOKEN_RE = re.compile(
    r"""
    (?P<marker>^[ \t]*\#[^\n]*)
  | (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v]+|\\\n)
  | (?P<str>(?:u8|u|U|L)?R"(?P<delim>[^()\\\s]*)\((?s:.*?)\)(?P=delim)"
        |(?:u8|u|U|L)?"(?:\\.|[^"\\\n])*")
  | (?P<chr>(?:u8|u|U|L)?'(?:\\.|[^'\\\n])+')
  | (?P<num>\.?\d(?:[eEpP][+-]|[0-9A-Za-z_.'])*)
  | (?P<id>[A-Za-z_]\w*)
  | (?P<punct>::|->|\.\.\.|<<=|>>=|<=>|[-+*/%&|^!=<>]=|&&|\|\||\+\+|--|<<|>>|\#\#
        |[{}\[\]();:,.?~<>=!+\-*/%&|^\#@$])
    """,
    re.X | re.M,
)
_LINEMARKER_RE = re.compile(r'^[ \t]*#(?:line)?[ \t]+(\d+)[ \t]+"((?:\\.|[^"\\])*)"')


@dataclass
class Tok:
    kind: str
    text: str
    start: int
    end: int
    file: str
    line: int


@dataclass
class Param:
    role: int
    index: int
    name: str
    line: int


@dataclass
class KernelFunction:
    name: str  # qualified C++ name, e.g. "::attention"
    params: list[Param]
    is_template: bool
    file: str
    line: int
    max_threads: int = 0


@dataclass
class KernelEntry:
    host_name: str
    function_expr: str  # e.g. "::attention<float, 64>"
    function: KernelFunction


@dataclass
class Translation:
    cpp: str
    kernels: list[KernelEntry] = field(default_factory=list)


def _error(tok: Tok, message: str) -> MetalSimCompileError:
    return MetalSimCompileError(f"{tok.file}:{tok.line}: {message}")


def tokenize(text: str, default_file: str) -> list[Tok]:
    toks: list[Tok] = []
    file, line = default_file, 1
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise MetalSimCompileError(
                f"{file}:{line}: metalsim cannot tokenize {text[pos : pos + 20]!r}"
            )
        kind = m.lastgroup
        if kind == "delim":
            kind = "str"
        tok_text = m.group()
        if kind == "marker":
            lm = _LINEMARKER_RE.match(tok_text)
            toks.append(Tok("marker", tok_text, m.start(), m.end(), file, line))
            if lm:
                # The marker names the line that follows it.
                file, line = lm.group(2).encode().decode("unicode_escape"), int(lm.group(1)) - 1
        else:
            toks.append(Tok(kind, tok_text, m.start(), m.end(), file, line))
            if kind in ("nl", "ws", "str"):
                line += tok_text.count("\n")
        pos = m.end()
    return toks


class _Editor:
    """Edits of the source text that keep its line count."""

    def __init__(self, text: str):
        self.text = text
        self.edits: list[tuple[int, int, str]] = []

    def replace(self, start: int, end: int, new: str) -> None:
        lost = self.text.count("\n", start, end) - new.count("\n")
        self.edits.append((start, end, new + "\n" * max(lost, 0)))

    def apply(self) -> str:
        out, pos = [], 0
        for start, end, new in sorted(self.edits):
            if start < pos:
                raise AssertionError("overlapping source edits")
            out.append(self.text[pos:start])
            out.append(new)
            pos = end
        out.append(self.text[pos:])
        return "".join(out)


def _is_float_literal(t: str) -> bool:
    low = t.lower()
    if low.startswith("0x"):
        return "p" in low
    return "." in t or "e" in low


def _float_literal_edit(tok: Tok) -> str | None:
    t = tok.text
    if not _is_float_literal(t):
        return None
    if t[-1] in "hH":
        return f"((half){t[:-1]}f)"
    if t[-1] in "fFlL":
        return None
    return t + "f"


class _Parser:
    def __init__(self, text: str, display_file: str):
        self.text = text
        self.all = tokenize(text, display_file)
        self.toks = [t for t in self.all if t.kind not in ("ws", "nl", "marker")]
        self.ed = _Editor(text)
        self.functions: dict[str, KernelFunction] = {}
        self.instances: list[tuple[str, str, str, Tok]] = []  # host name, base name, expr, tok

    # -- token helpers ------------------------------------------------------------------
    def tok(self, i: int) -> Tok | None:
        return self.toks[i] if 0 <= i < len(self.toks) else None

    def is_(self, i: int, text: str) -> bool:
        t = self.tok(i)
        return t is not None and t.text == text and t.kind in ("punct", "id")

    def match_close(self, i: int) -> int:
        """Index of the bracket closing the one at i ((, [, {)."""
        pairs = {"(": ")", "[": "]", "{": "}"}
        stack = []
        for j in range(i, len(self.toks)):
            t = self.toks[j]
            if t.kind != "punct":
                continue
            if t.text in pairs:
                stack.append(pairs[t.text])
            elif t.text in (")", "]", "}"):
                if not stack or stack.pop() != t.text:
                    raise _error(t, f"unbalanced '{t.text}'")
                if not stack:
                    return j
        raise _error(self.toks[i], f"unclosed '{self.toks[i].text}'")

    def match_angle(self, i: int) -> int:
        """Index of the '>' closing the '<' at i (template argument lists)."""
        depth = 0
        j = i
        while j < len(self.toks):
            t = self.toks[j]
            if t.text in ("(", "[", "{") and t.kind == "punct":
                j = self.match_close(j) + 1
                continue
            if t.text == "<":
                depth += 1
            elif t.text == ">":
                depth -= 1
            elif t.text == ">>":
                depth -= 2
            if depth <= 0 and t.text in (">", ">>"):
                return j
            if t.text in (";", "{", "}"):
                break
            j += 1
        raise _error(self.toks[i], "unclosed '<'")

    def attribute_at(self, i: int) -> int | None:
        """If an attribute specifier [[...]] starts at i, the index of its last ']'."""
        if self.is_(i, "[") and self.is_(i + 1, "["):
            j = self.match_close(i)
            if self.is_(j - 1, "]"):
                return j
        return None

    def attributes(self, i: int, j: int) -> list[tuple[str, list[Tok], Tok]]:
        """The attributes of the specifier toks[i..j]: (name, argument tokens, name token)."""
        out = []
        k = i + 2
        while k < j - 1:
            if self.is_(k, ","):
                k += 1
                continue
            name_tok = self.toks[k]
            name = name_tok.text
            k += 1
            while self.is_(k, "::"):
                name += "::" + self.toks[k + 1].text
                k += 2
            args: list[Tok] = []
            if self.is_(k, "("):
                close = self.match_close(k)
                args = self.toks[k + 1 : close]
                k = close + 1
            out.append((name, args, name_tok))
        return out

    def text_of(self, toks: list[Tok]) -> str:
        return " ".join(t.text for t in toks)

    def int_arg(self, args: list[Tok], where: Tok) -> int:
        expr = "".join(t.text for t in args)
        if not re.fullmatch(r"[0-9+\-*()uU ]+", expr):
            raise _error(where, f"metalsim needs a constant index here, got '{expr}'")
        try:
            return int(eval(expr.replace("u", "").replace("U", ""), {"__builtins__": {}}, {}))
        except Exception as exc:  # noqa: BLE001 - report any parse failure the same way
            raise _error(where, f"metalsim cannot evaluate the index '{expr}'") from exc

    # -- passes --------------------------------------------------------------------------
    def run(self) -> Translation:
        self.check_unsupported()
        for t in self.toks:
            if t.kind == "num":
                new = _float_literal_edit(t)
                if new is not None:
                    self.ed.replace(t.start, t.end, new)
        self.scan()
        kernels = self.resolve_kernels()
        return Translation(self.ed.apply(), kernels)

    def check_unsupported(self) -> None:
        for t in self.toks:
            if t.kind != "id":
                continue
            reason = _UNSUPPORTED.get(t.text)
            if reason is None:
                reason = next(
                    (why for rx, why in _UNSUPPORTED_PATTERNS if rx.fullmatch(t.text)), None
                )
            if reason is not None:
                raise _error(t, f"`{t.text}` is not supported by metalsim: {reason}.")

    def scan(self) -> None:
        """One pass over the tokens: kernels, instantiations, threadgroup variables, attributes."""
        # Brace stack entries: ("ns", name) | ("class", "") | ("code", "")
        braces: list[tuple[str, str]] = []
        template_end = -1  # index of the first token after the latest `template <...>`
        stmt_start = 0  # index of the first token of the current statement/declaration
        i = 0
        n = len(self.toks)
        while i < n:
            t = self.toks[i]
            attr_end = self.attribute_at(i)
            if attr_end is not None:
                attrs = self.attributes(i, attr_end)
                names = {a[0] for a in attrs}
                for name, _, name_tok in attrs:
                    base = name.split("(")[0]
                    if base in _UNSUPPORTED_ATTRIBUTES:
                        raise _error(
                            name_tok,
                            f"[[{base}]] is not supported by metalsim: {_UNSUPPORTED_ATTRIBUTES[base]}.",
                        )
                if "kernel" in names:
                    i = self.kernel_function(i, braces, template_end, stmt_start)
                    continue
                if not names <= _STANDARD_ATTRIBUTES and not all("::" in x for x in names):
                    self.ed.replace(t.start, self.toks[attr_end].end, " ")
                i = attr_end + 1
                continue
            if t.kind == "id" and t.text == "template":
                if self.is_(i + 1, "<"):
                    close = self.match_angle(i + 1)
                    template_end = close + 1
                    i = close + 1
                    stmt_start = i
                    continue
                i = self.explicit_instantiation(i, braces)
                stmt_start = i
                continue
            if t.kind == "id" and t.text == "kernel":
                i = self.kernel_function(i, braces, template_end, stmt_start)
                continue
            if t.kind == "id" and t.text == "threadgroup" and i == stmt_start:
                in_code = any(kind == "code" for kind, _ in braces)
                i = self.threadgroup_declaration(i, in_code)
                stmt_start = i
                continue
            if t.kind == "punct" and t.text == "{":
                braces.append(self.brace_kind(stmt_start, i))
                stmt_start = i + 1
            elif t.kind == "punct" and t.text == "}":
                if braces:
                    braces.pop()
                stmt_start = i + 1
            elif t.kind == "punct" and t.text == ";":
                stmt_start = i + 1
            elif t.kind == "punct" and t.text == ":" and i == stmt_start + 1:
                stmt_start = i + 1  # a label, `public:`, `case x:`
            i += 1

    def brace_kind(self, start: int, brace: int) -> tuple[str, str]:
        head = self.toks[start:brace]
        texts = [h.text for h in head]
        if "namespace" in texts:
            k = texts.index("namespace")
            name = "::".join(x for x in texts[k + 1 :] if x != "::")
            return ("ns", name)
        if texts and texts[0] in ("struct", "class", "union", "enum") and "(" not in texts:
            return ("class", "")
        if (
            texts
            and texts[0] == "typedef"
            and texts[1:2]
            and texts[1] in ("struct", "union", "enum")
        ):
            return ("class", "")
        if texts and texts[0] == "extern":
            return ("ns", "")  # extern "C" { ... }
        return ("code", "")

    @staticmethod
    def qualifier(braces: list[tuple[str, str]]) -> str:
        names = [name for kind, name in braces if kind == "ns" and name]
        return "::" + "".join(f"{n}::" for n in names)

    def kernel_function(
        self, i: int, braces: list[tuple[str, str]], template_end: int, stmt_start: int
    ) -> int:
        start_tok = self.toks[i]
        max_threads = 0
        # Declaration specifiers before the name: attributes, `kernel`, the return type.
        j = i
        while True:
            attr_end = self.attribute_at(j)
            if attr_end is not None:
                for name, args, name_tok in self.attributes(j, attr_end):
                    if name == "max_total_threads_per_threadgroup":
                        max_threads = self.int_arg(args, name_tok)
                self.ed.replace(self.toks[j].start, self.toks[attr_end].end, " ")
                j = attr_end + 1
                continue
            if self.is_(j, "("):
                break
            if j >= len(self.toks) or self.toks[j].text in (";", "{", "}"):
                raise _error(start_tok, "cannot parse this kernel declaration")
            j += 1
        name_tok = self.toks[j - 1]
        if name_tok.kind != "id":
            raise _error(name_tok, "cannot find the kernel's name")
        close = self.match_close(j)
        params = self.kernel_params(j + 1, close, name_tok.text)
        k = close + 1
        while k < len(self.toks) and not self.is_(k, "{") and not self.is_(k, ";"):
            attr_end = self.attribute_at(k)
            if attr_end is not None:
                self.ed.replace(self.toks[k].start, self.toks[attr_end].end, " ")
                k = attr_end + 1
            else:
                k += 1
        if self.is_(k, ";"):  # a declaration only
            return k + 1
        qualified = self.qualifier(braces) + name_tok.text
        is_template = template_end >= 0 and stmt_start == template_end
        self.functions[qualified] = KernelFunction(
            qualified, params, is_template, name_tok.file, name_tok.line, max_threads
        )
        return k  # the body's '{' is handled by the scanner

    def kernel_params(self, lo: int, hi: int, kernel: str) -> list[Param]:
        params: list[Param] = []
        groups: list[list[int]] = [[]]
        depth = 0
        for k in range(lo, hi):
            t = self.toks[k]
            if t.kind == "punct" and t.text in ("(", "[", "{", "<"):
                depth += 1
            elif t.kind == "punct" and t.text in (")", "]", "}", ">"):
                depth -= 1
            elif t.kind == "punct" and t.text == ">>":
                depth -= 2
            if t.kind == "punct" and t.text == "," and depth == 0:
                groups.append([])
            else:
                groups[-1].append(k)
        for g in groups:
            if not g or (len(g) == 1 and self.toks[g[0]].text == "void"):
                continue
            role = index = None
            name = None
            k = g[0]
            end = g[-1]
            while k <= end:
                attr_end = self.attribute_at(k)
                if attr_end is None:
                    if self.toks[k].kind == "id":
                        name = self.toks[k].text
                    k += 1
                    continue
                for aname, args, atok in self.attributes(k, attr_end):
                    if aname == "buffer":
                        role, index = ROLE_BUFFER, self.int_arg(args, atok)
                    elif aname == "threadgroup":
                        role, index = ROLE_THREADGROUP, self.int_arg(args, atok)
                    elif aname in BUILTINS:
                        role, index = BUILTINS[aname], 0
                    elif aname in _UNSUPPORTED_ATTRIBUTES:
                        raise _error(
                            atok,
                            f"[[{aname}]] is not supported by metalsim: {_UNSUPPORTED_ATTRIBUTES[aname]}.",
                        )
                    else:
                        raise _error(
                            atok,
                            f"kernel '{kernel}': parameter attribute [[{aname}]] is not supported "
                            "by metalsim",
                        )
                self.ed.replace(self.toks[k].start, self.toks[attr_end].end, " ")
                k = attr_end + 1
            first = self.toks[g[0]]
            if role is None:
                raise _error(
                    first,
                    f"kernel '{kernel}': parameter '{name}' needs an attribute such as "
                    "[[buffer(0)]] or [[thread_position_in_grid]]",
                )
            if role in (ROLE_BUFFER, ROLE_THREADGROUP) and not 0 <= index <= 30:
                raise _error(first, f"kernel '{kernel}': index {index} is outside 0..30")
            params.append(Param(role, index, name or "?", first.line))
        seen: dict[tuple[int, int], str] = {}
        for p in params:
            if p.role in (ROLE_BUFFER, ROLE_THREADGROUP):
                key = (p.role, p.index)
                if key in seen:
                    kind = "buffer" if p.role == ROLE_BUFFER else "threadgroup"
                    raise MetalSimCompileError(
                        f"kernel '{kernel}': parameters '{seen[key]}' and '{p.name}' both use "
                        f"[[{kind}({p.index})]]"
                    )
                seen[key] = p.name
        return params

    def explicit_instantiation(self, i: int, braces: list[tuple[str, str]]) -> int:
        """`template [[host_name("n")]] [[kernel]] decl;`: record it and delete it (the glue
        takes the address of the specialization, which instantiates it)."""
        start = self.toks[i]
        host_name = None
        j = i + 1
        declarator: tuple[int, int] | None = None  # (first token of the name, its '<')
        paren = 0
        is_kernel = False
        while j < len(self.toks) and not (self.is_(j, ";") and paren == 0):
            attr_end = self.attribute_at(j) if paren == 0 else None
            if attr_end is not None:
                for name, args, atok in self.attributes(j, attr_end):
                    is_kernel = is_kernel or name == "kernel"
                    if name == "host_name":
                        if len(args) != 1 or args[0].kind != "str":
                            raise _error(atok, 'host_name needs a string: [[host_name("name")]]')
                        host_name = args[0].text[1:-1]
                j = attr_end + 1
                continue
            t = self.toks[j]
            if t.kind == "id" and t.text == "kernel" and paren == 0:
                is_kernel = True
            if t.text == "(":
                paren += 1
            elif t.text == ")":
                paren -= 1
            elif t.kind == "id" and paren == 0 and self.is_(j + 1, "<"):
                close = self.match_angle(j + 1)
                if self.is_(close + 1, "(") or self.is_(close + 1, ";"):
                    first = j
                    while self.is_(first - 1, "::") and self.tok(first - 2).kind == "id":
                        first -= 2
                    declarator = (first, j + 1)
                j = close + 1
                continue
            j += 1
        end = j
        if host_name is None and not is_kernel:
            return end + 1  # an ordinary explicit instantiation: leave it to the compiler
        if declarator is None:
            raise _error(start, "cannot find the function this explicit instantiation names")
        if host_name is None:
            raise _error(
                start,
                'a template kernel is instantiated without [[host_name("...")]]: metalsim '
                "finds kernels by their host name",
            )
        first, lt = declarator
        base = "".join(t.text for t in self.toks[first:lt])
        close = self.match_angle(lt)
        args = self.text_of(self.toks[lt + 1 : close])
        if close == lt + 1:
            args = ""
        if self.toks[close].text == ">>":
            args += " >"
        qualified = base if base.startswith("::") else self.qualifier(braces) + base
        self.instances.append((host_name, qualified, f"{qualified}<{args}>", start))
        self.ed.replace(start.start, self.toks[end].end, " ")
        return end + 1

    def threadgroup_declaration(self, i: int, in_code: bool) -> int:
        start = self.toks[i]
        j = i + 1
        while j < len(self.toks) and not self.is_(j, ";"):
            if self.toks[j].text in ("(", "[", "{") and self.toks[j].kind == "punct":
                j = self.match_close(j) + 1
                continue
            if self.toks[j].text in ("{", "}"):
                break
            j += 1
        body = list(range(i + 1, j))
        texts = [self.toks[k].text for k in body]
        # A pointer or reference to threadgroup memory, not a threadgroup variable.
        top = []
        depth = 0
        for k in body:
            t = self.toks[k]
            if t.text in ("(", "[", "{", "<"):
                depth += 1
            elif t.text in (")", "]", "}", ">"):
                depth -= 1
            elif t.text == ">>":
                depth -= 2
            elif depth == 0:
                top.append(t.text)
        if any(x in ("*", "&", "&&", "(") for x in top) or "(" in texts[:1]:
            return j + 1
        if not in_code:
            raise _error(
                start,
                "a `threadgroup` variable outside a function body: declare it in the kernel",
            )
        if "=" in top:
            raise _error(start, "threadgroup variables cannot have an initializer")
        if "," in top:
            raise _error(start, "metalsim: declare one threadgroup variable per statement")
        # threadgroup <type> <name> [dims...] ;
        k = len(body) - 1
        while k >= 0 and self.toks[body[k]].text == "]":
            open_ = k
            depth = 0
            while open_ >= 0:
                x = self.toks[body[open_]].text
                depth += x == "]"
                depth -= x == "["
                if depth == 0:
                    break
                open_ -= 1
            k = open_ - 1
        if k < 1 or self.toks[body[k]].kind != "id":
            raise _error(start, "cannot parse this threadgroup variable declaration")
        name = self.toks[body[k]].text
        type_text = self.text_of([self.toks[x] for x in body[:k]])
        dims = self.text_of([self.toks[x] for x in body[k + 1 :]])
        new = f'auto& {name} = ::metalsim::tg_var<{type_text} {dims}>("{name}");'
        self.ed.replace(start.start, self.toks[j].end, new)
        return j + 1

    def resolve_kernels(self) -> list[KernelEntry]:
        entries: list[KernelEntry] = []
        for f in self.functions.values():
            if not f.is_template:
                entries.append(KernelEntry(f.name.lstrip(":").split("::")[-1], f.name, f))
        for host_name, qualified, expr, tok in self.instances:
            f = self.functions.get(qualified)
            if f is None:
                raise _error(
                    tok,
                    f"[[host_name(\"{host_name}\")]] instantiates '{qualified}', which is not a "
                    "template kernel defined before it",
                )
            entries.append(KernelEntry(host_name, expr, f))
        names: dict[str, KernelEntry] = {}
        for e in entries:
            if e.host_name in names:
                raise MetalSimCompileError(f"two kernels are named '{e.host_name}'")
            names[e.host_name] = e
        return entries


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def glue(kernels: list[KernelEntry]) -> str:
    """The registration code appended to the translation unit."""
    out = ['#line 1 "<metalsim glue>"', "namespace metalsim_generated {"]
    for n, e in enumerate(kernels):
        rows = [
            f"{{{p.role}, {p.index}, {_c_string(p.name)}, {p.line}}}" for p in e.function.params
        ]
        rows.append("{0, 0, nullptr, 0}")
        out.append(f"static const ms_param params_{n}[] = {{{', '.join(rows)}}};")
        out.append(
            f"static_assert(::metalsim::glue::arity(&{e.function_expr}) == "
            f'{len(e.function.params)}, "metalsim: parameter count mismatch");'
        )
        out.append(
            f"static void entry_{n}(const ms_thread_args* t) "
            f"{{ ::metalsim::glue::call(&{e.function_expr}, t, params_{n}); }}"
        )
    out.append("static const ms_kernel kernels[] = {")
    for n, e in enumerate(kernels):
        f = e.function
        out.append(
            f"  {{{_c_string(e.host_name)}, {_c_string(e.function_expr)}, entry_{n}, "
            f"{len(f.params)}, params_{n}, ::metalsim::glue::layouts(&{e.function_expr}), "
            f"{_c_string(f.file)}, {f.line}, {f.max_threads}u}},"
        )
    if not kernels:
        out.append("  {nullptr, nullptr, nullptr, 0, nullptr, nullptr, nullptr, 0, 0u},")
    out.append("};")
    out.append(
        f"static const ms_kernel_table table = {{METALSIM_ABI_VERSION, {len(kernels)}u, kernels}};"
    )
    out.append("}  // namespace metalsim_generated")
    out.append(
        'extern "C" __attribute__((visibility("default"))) const ms_kernel_table* '
        "metalsim_kernels() { return &metalsim_generated::table; }"
    )
    return "\n".join(out) + "\n"


def translate(preprocessed: str, display_file: str) -> Translation:
    """Rewrite preprocessed MSL into C++ for the shim; raises MetalSimCompileError."""
    tr = _Parser(preprocessed, display_file).run()
    if not tr.kernels:
        raise MetalSimCompileError(
            f"{display_file}: no kernels found (a `kernel void f(...)` function, or a template "
            'kernel instantiated with `template [[host_name("name")]] [[kernel]] ...`)'
        )
    tr.cpp = tr.cpp + "\n" + glue(tr.kernels)
    return tr
