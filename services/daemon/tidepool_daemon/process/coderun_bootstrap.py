"""Bootstrap for Python `code_run`: passed to `python3 -u -c` by the daemon, never imported by it.

Invocation: `python3 -u -c <this file's text> <charts file> [argv...]`, with the user's code on stdin.
It behaves like `python3 -u - [argv...]` (sys.argv[0] == "-", `__name__ == "__main__"`, `__file__ ==
"<stdin>"`, the cwd first on sys.path, tracebacks without frames of this bootstrap, exit status 1 on an
uncaught exception) and additionally captures matplotlib figures: when `matplotlib.pyplot` is imported
it selects the Agg backend (unless the user chose one) and wraps `pyplot.show()`; every figure shown,
and every figure still open at exit, is described as chart JSON (the SDK's snake_case chart schema, see
daytona/common/charts.py) and appended as one line to the charts file. Program output stays untouched:
the charts travel through that file, never through stdout.

Standard library only at start-up (matplotlib and numpy are touched only once the user imports pyplot),
so a plain `print(1)` pays nothing for the chart support.
"""

import sys


def _tidepool_bootstrap() -> None:
    import builtins
    import types

    charts_path = sys.argv[1]
    sys.argv = ["-", *sys.argv[2:]]
    source = sys.stdin.buffer.read()

    hook = _PyplotImportHook(charts_path)
    sys.meta_path.insert(0, hook)

    try:
        code = compile(source, "<stdin>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        _print_exception(exc, None)
        raise SystemExit(1) from None

    main_module = types.ModuleType("__main__")
    main_module.__dict__.update({"__builtins__": builtins, "__file__": "<stdin>", "__cached__": None})
    sys.modules["__main__"] = main_module
    _report_started()
    try:
        exec(code, main_module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        # Skip the bootstrap's own frame, as `python3 -` would show only the user's frames.
        traceback = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        _print_exception(exc, traceback)
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 1) from None


def _report_started() -> None:
    """Tell the daemon the user's code starts now: its timeout counts from here, not from the start of
    the interpreter (the descriptor is the write end of a pipe the daemon passed; the variable is removed
    so the user's code never sees it)."""
    import os

    raw = os.environ.pop("TIDEPOOL_CODE_RUN_STARTED_FD", "")
    if raw.isdigit():
        try:
            os.write(int(raw), b"1")
            os.close(int(raw))
        except OSError:
            pass


def _print_exception(exc, traceback) -> None:
    import traceback as traceback_module

    sys.stdout.flush()
    traceback_module.print_exception(type(exc), exc, traceback, file=sys.stderr)
    sys.stderr.flush()


class _PyplotImportHook:
    """A meta path finder that patches `matplotlib.pyplot` right after it is first imported."""

    def __init__(self, charts_path: str) -> None:
        self._charts_path = charts_path

    def find_spec(self, name, path=None, target=None):
        if name != "matplotlib.pyplot":
            return None
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]
        import importlib.util

        _prefer_agg_backend()
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        original_exec_module = getattr(loader, "exec_module", None)
        if original_exec_module is None:
            return spec
        charts_path = self._charts_path

        def exec_module(module) -> None:
            original_exec_module(module)
            _install_chart_capture(module, charts_path)

        loader.exec_module = exec_module
        return spec


def _prefer_agg_backend() -> None:
    """Headless rendering unless the user picked a backend (MPLBACKEND or matplotlib.use())."""
    import os

    if os.environ.get("MPLBACKEND"):
        return
    try:
        import matplotlib
        from matplotlib import rcsetup

        if dict.__getitem__(matplotlib.rcParams, "backend") is rcsetup._auto_backend_sentinel:
            matplotlib.use("Agg")
    except Exception:
        pass


def _install_chart_capture(pyplot, charts_path: str) -> None:
    import atexit

    def capture_open_figures() -> None:
        for number in list(pyplot.get_fignums()):
            figure = pyplot.figure(number)
            try:
                chart = _describe_figure(figure)
            except Exception as exc:  # a chart we cannot describe must not break the user's program
                chart = {"type": "unknown", "title": f"chart extraction failed: {exc}", "elements": []}
            _append_chart(charts_path, chart)
            pyplot.close(figure)

    def show(*args, **kwargs) -> None:
        capture_open_figures()

    show.__doc__ = pyplot.show.__doc__
    pyplot.show = show
    # Registered after pyplot's own atexit handler (which destroys all figures), so it runs before it.
    atexit.register(capture_open_figures)


def _append_chart(charts_path: str, chart: dict) -> None:
    import json

    line = json.dumps(chart, allow_nan=False, separators=(",", ":"))
    with open(charts_path, "a", encoding="utf-8") as charts_file:
        charts_file.write(line + "\n")


def _describe_figure(figure) -> dict:
    axes_list = [axes for axes in figure.get_axes() if axes.get_visible() and _has_content(axes)]
    if not axes_list:
        axes_list = list(figure.get_axes())[:1]
    if len(axes_list) == 1:
        chart = _describe_axes(axes_list[0])
    else:
        suptitle = getattr(figure, "_suptitle", None)
        chart = {
            "type": "composite_chart",
            "title": suptitle.get_text() if suptitle is not None else "",
            "elements": [_describe_axes(axes) for axes in axes_list],
        }
    chart["png"] = _figure_png(figure)
    if not chart.get("title"):
        suptitle = getattr(figure, "_suptitle", None)
        if suptitle is not None:
            chart["title"] = suptitle.get_text()
    return chart


def _has_content(axes) -> bool:
    return bool(axes.get_lines() or axes.collections or axes.patches or axes.images)


def _figure_png(figure) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _describe_axes(axes) -> dict:
    from matplotlib.collections import PathCollection
    from matplotlib.patches import Rectangle, Wedge

    chart = {
        "title": axes.get_title(),
        "x_label": axes.get_xlabel(),
        "y_label": axes.get_ylabel(),
    }
    wedges = [patch for patch in axes.patches if isinstance(patch, Wedge)]
    bars = [patch for patch in axes.patches if isinstance(patch, Rectangle)]
    scatters = [collection for collection in axes.collections if isinstance(collection, PathCollection)]
    lines = [line for line in axes.get_lines() if len(line.get_xydata())]

    if wedges:
        chart["type"] = "pie"
        labels = [text.get_text() for text in axes.texts]
        chart["elements"] = [
            {
                "label": labels[index] if index < len(labels) else "",
                "angle": _number(abs(wedge.theta2 - wedge.theta1)),
                "radius": _number(wedge.r),
            }
            for index, wedge in enumerate(wedges)
        ]
        return chart
    if bars and not lines and not scatters:
        chart["type"] = "bar"
        chart["elements"] = _bar_elements(axes, bars)
        _add_axis_details(chart, axes, ticks=False)
        return chart
    if scatters and not lines:
        chart["type"] = "scatter"
        chart["elements"] = [
            {"label": _visible_label(collection.get_label()), "points": _points(collection.get_offsets())}
            for collection in scatters
        ]
        _add_axis_details(chart, axes, ticks=True)
        return chart
    if lines:
        chart["type"] = "line"
        chart["elements"] = [
            {"label": _visible_label(line.get_label()), "points": _points(line.get_xydata())}
            for line in lines
        ]
        _add_axis_details(chart, axes, ticks=True)
        return chart
    chart["type"] = "unknown"
    chart["elements"] = []
    return chart


def _bar_elements(axes, bars) -> list:
    containers = getattr(axes, "containers", [])
    group_of = {}
    for container in containers:
        for patch in getattr(container, "patches", []):
            group_of[id(patch)] = _visible_label(container.get_label())
    vertical = all(bar.get_width() <= bar.get_height() or bar.get_y() == 0 for bar in bars)
    tick_labels = {}
    ticks = axes.get_xticks() if vertical else axes.get_yticks()
    labels = axes.get_xticklabels() if vertical else axes.get_yticklabels()
    for tick, label in zip(ticks, labels):  # noqa: B905 (stays runnable on pre-3.10 user pythons)
        tick_labels[round(float(tick), 6)] = label.get_text()
    elements = []
    for bar in bars:
        center = bar.get_x() + bar.get_width() / 2 if vertical else bar.get_y() + bar.get_height() / 2
        value = bar.get_height() if vertical else bar.get_width()
        elements.append(
            {
                "label": tick_labels.get(round(float(center), 6), _format_number(center)),
                "value": _format_number(value),
                "group": group_of.get(id(bar), ""),
            }
        )
    return elements


def _add_axis_details(chart: dict, axes, ticks: bool) -> None:
    chart["x_scale"] = axes.get_xscale()
    chart["y_scale"] = axes.get_yscale()
    chart["x_tick_labels"] = [label.get_text() for label in axes.get_xticklabels()]
    chart["y_tick_labels"] = [label.get_text() for label in axes.get_yticklabels()]
    if ticks:
        chart["x_ticks"] = [_number(tick) for tick in axes.get_xticks() if _finite(tick)]
        chart["y_ticks"] = [_number(tick) for tick in axes.get_yticks() if _finite(tick)]


def _visible_label(label) -> str:
    label = "" if label is None else str(label)
    return "" if label.startswith("_") else label


def _finite(value) -> bool:
    import math

    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _number(value):
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def _format_number(value) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def _points(xy) -> list:
    points = []
    for row in xy:
        try:
            x_value, y_value = row[0], row[1]
        except (TypeError, IndexError):
            continue
        if _finite(x_value) and _finite(y_value):
            points.append([_number(x_value), _number(y_value)])
    return points


_tidepool_bootstrap()
