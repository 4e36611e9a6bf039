"""The bundled trainer (installed as ``napari_r2au.training``); no napari or Qt here."""
