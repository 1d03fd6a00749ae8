"""dtbuild's built-in plugins, one module per feature, each registered through the
``dtbuild`` entry-point group of pyproject.toml exactly as a third-party plugin is (see
``dtbuild plugins``), and each blockable with ``-p no:NAME``:

======================  ===================================================================
``core``                files, genrule, fetch_url and their action kinds
``images``              pure_layer, image, image_archive: layers, assembly, archives
``layered``             layered_image, merge_images, export_image, shell_image and the helper rules
``root_layers``         root_layer and image's run_as_root (overlay builds), the layer kind
``registries``          pull_image
``compressors``         the none, gz and zstd compressors
``executors``           the local, namespace and vm executors and the choice among them
``debian``              deb_packages, its action kinds and the ``lock`` command
======================  ===================================================================

A unit test checks that every ``*_plugin`` module here is an entry point, and that the
installed metadata has them all.

The rest of this package is the library those plugins use. Imports happen inside the
hooks, so that a process pays only for what it registers.
"""

from __future__ import annotations

from dtbuild.plugins.builtin.executors_plugin import dtbuild_select_executor

__all__ = ["dtbuild_select_executor"]
