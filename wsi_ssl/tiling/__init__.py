"""wsi_ssl.tiling"""
