"""One module per chapter with that chapter's experiment code (``chNN_slug.py``, beside ``ftbook/specs/chNN_slug.py``
and ``chapters/NN_slug.ipynb``). A lab imports the core package and the methods, never another lab: what two
chapters share moves down into core or a method module, under a name that says what it is."""
