{{/* The name of a revisioned object: weftd, or weftd-<revision>. */}}
{{- define "base.name" -}}
{{ .name }}{{ if .revision }}-{{ .revision }}{{ end }}
{{- end }}

{{- define "base.labels" -}}
app.kubernetes.io/part-of: weft
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
