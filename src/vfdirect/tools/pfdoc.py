"""``python -m vfdirect.tools.pfdoc > docs/pf-admin.md``: the PF admin reference page,
generated from the method table of :mod:`vfdirect.core.adapter.methods`."""

from vfdirect.core.adapter.methods import methods_markdown

if __name__ == "__main__":
    print(methods_markdown())
