"""The rule-authoring API: ``rule``, ``attrs``, providers and action declarations.

Pure analysis: nothing here reads or writes files or imports the engine.
"""
