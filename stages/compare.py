"""Stage compare: the results table (Markdown + CSV) and a grouped bar chart."""

from cxr import paths
from cxr.cli import run
from cxr.compare import bar_chart, summary_table, to_markdown
from cxr.files import atomic_write, read_json, write_text
from cxr.params import APPROACHES


def main() -> None:
    table = summary_table({name: read_json(paths.metrics_file(name)) for name in APPROACHES})
    markdown = to_markdown(table)
    write_text(paths.METRICS / "summary.md", markdown)
    atomic_write(paths.METRICS / "summary.csv", lambda tmp: table.round(6).to_csv(tmp, index=False))
    bar_chart(table, paths.PLOTS / "compare.png")
    print(markdown)


if __name__ == "__main__":
    run(main)
