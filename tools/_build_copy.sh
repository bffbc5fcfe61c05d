# tools/_build_copy.sh - sourced by sanitize.sh and memcheck.sh: copies the package and tests to
# $WORK/pkg and builds the extension there with $CFLAGS / $LDFLAGS, leaving the source tree's
# in-place build untouched. Expects ROOT (the repository), WORK and PY to be set.
rm -rf "$WORK" && mkdir -p "$WORK/pkg"
cp -r "$ROOT/smallmind" "$ROOT/tests" "$ROOT/tools" "$ROOT/bench" "$ROOT/fuzz" "$ROOT/docs" "$ROOT/README.md" "$ROOT/LICENSE" "$ROOT/mkdocs.yml" "$ROOT/.gitignore" "$WORK/pkg/"
rm -f "$WORK"/pkg/smallmind/core/*.so "$WORK"/pkg/smallmind/core/_core.c
(cd "$ROOT" && "$PY" setup.py -q build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp" 2>&1 \
    | { grep -iE "error|warning: " || true; })
cp "$WORK"/lib/smallmind/core/_core*.so "$WORK/pkg/smallmind/core/"
