"""Graphviz drawings of rewritten regions: the nodes each rewrite removed, beside what replaced them."""

from __future__ import annotations

from torch.fx import Graph, Node


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name}\n{node.op} {target}"


def _regions(removed: list[Node]) -> list[list[Node]]:
    """Connected groups of removed nodes, in graph order."""
    names = {n.name for n in removed}
    group_of: dict[str, int] = {}
    groups: list[list[Node]] = []
    for node in removed:
        linked = {group_of[a.name] for a in node.all_input_nodes if a.name in names and a.name in group_of}
        if not linked:
            group_of[node.name] = len(groups)
            groups.append([node])
            continue
        target = min(linked)
        for other in sorted(linked - {target}, reverse=True):
            for moved in groups[other]:
                group_of[moved.name] = target
            groups[target] += groups[other]
            groups[other] = []
        group_of[node.name] = target
        groups[target].append(node)
    return [g for g in groups if g]


def regions_dot(graphs: list[tuple[Graph, Graph]]) -> str:
    """One ``digraph``: per rewritten region, a cluster of the original nodes and one of the replacement.

    ``graphs`` pairs each captured graph before rewriting with the same graph after.
    """
    lines = ["digraph attncompiler {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for g, (before, after) in enumerate(graphs):
        kept = {n.name for n in after.nodes}
        removed = [n for n in before.nodes if n.name not in kept and n.op not in ("placeholder", "output")]
        replacements = [n for n in after.nodes if n.op == "call_function" and "attncompiler" in str(n.target)]
        for r, region in enumerate(_regions(removed)):
            ids = {n.name: f"g{g}_r{r}_{n.name}" for n in region}
            lines.append(f"  subgraph cluster_g{g}_r{r}_before {{")
            lines.append(f"    label={_quote(f'graph {g}, region {r}: before')}; style=dashed; color=gray40;")
            for node in region:
                lines.append(f"    {ids[node.name]} [label={_quote(_label(node))}];")
            lines.append("  }")
            for node in region:
                for arg in node.all_input_nodes:
                    source = ids.get(arg.name)
                    if source is None:
                        source = f"g{g}_in_{arg.name}"
                        lines.append(f"  {source} [label={_quote(arg.name)}, shape=ellipse];")
                    lines.append(f"  {source} -> {ids[node.name]};")
            if r < len(replacements):
                node = replacements[r]
                name = f"g{g}_r{r}_after"
                program = next((a for a in node.args if isinstance(a, str) and a.startswith("(")), "")
                lines.append(f"  subgraph cluster_{name} {{")
                lines.append(f"    label={_quote(f'graph {g}, region {r}: after')}; color=darkgreen;")
                lines.append(f"    {name} [label={_quote(f'{node.name}{chr(10)}{program}')}, "
                             "style=filled, fillcolor=palegreen];")
                lines.append("  }")
                for arg in node.all_input_nodes:
                    lines.append(f"  g{g}_in_{arg.name} [label={_quote(arg.name)}, shape=ellipse];")
                    lines.append(f"  g{g}_in_{arg.name} -> {name};")
    lines.append("}")
    return "\n".join(lines) + "\n"
