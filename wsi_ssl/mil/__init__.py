"""wsi_ssl.mil"""
