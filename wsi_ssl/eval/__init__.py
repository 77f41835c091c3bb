"""wsi_ssl.eval"""
