"""Plain-text tables for the reports `print()` shows."""


def format_table(header, rows) -> list:
    """Left-aligned columns, two spaces apart.

    Args:
        header: the column titles.
        rows: sequences of cells (anything `str()` accepts), as many as
            `header` has titles.

    Returns:
        The lines: the header, then one per row.

    Example:

    >>> format_table(("layer", "params"), [("query", "1,024")])
    ['layer  params', 'query  1,024 ']
    """
    header = [str(cell) for cell in header]
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return [line.format(*header)] + [line.format(*row) for row in rows]
