"""Built-in rules, each written against the public rule API like any plugin's."""
