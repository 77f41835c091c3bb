"""wsi_ssl.encoders"""
