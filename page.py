"""page.py: what every self-contained HTML page of the project shares: styles, escaping, tables, figures.

report.py (a run's report) and slide.py (a slide's map) build their pages from these: styles inline
and figures as data URIs, so a page needs nothing beside it and reads the same mailed or archived.
"""
import base64
import html
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

CSS = """body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#111;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-top:.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #bbb;padding:.25em .6em;
text-align:right}th{background:#eee}table.text td,table.text th{text-align:left}
td:first-child,th:first-child{text-align:left}
.banner{padding:.6em 1em;margin:.8em 0;font-weight:bold;border-radius:4px}
.synthetic{background:#fff3b0;border:2px solid #c9a400}.unverified{background:#ffd6d6;border:2px solid #b00}
figure{margin:1em 0;page-break-inside:avoid}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444}code,pre{background:#f4f4f4;padding:.1em .3em}pre{padding:.6em;overflow-x:auto}
@media print{body{max-width:none}h2{page-break-after:avoid}}"""


def version(package):
    try:
        return package_version(package)
    except PackageNotFoundError:
        return "?"


def esc(value):
    return html.escape(str(value))


def table(headers, rows, kind="numbers"):
    """An HTML table; kind "text" aligns every cell left (settings, names), "numbers" right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{kind}"><tr>{head}</tr>{body}</table>'


def figure(path, caption):
    """An <img> with the PNG embedded as a data URI, or nothing if the run has no such figure."""
    if not path.is_file():
        return ""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")
