"""File system routes: listing, info, moves and permissions (`files`), uploads and downloads (`transfer`),
find/search/replace (`search`, with `globs`).
"""
