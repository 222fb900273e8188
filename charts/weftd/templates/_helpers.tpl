{{/*
The values in force: the chart's defaults, then the profile's, then the user's.
*/}}
{{- define "weftd.values" -}}
{{- $name := .Values.profile | default "default" }}
{{- if not (has $name (list "default" "demo" "minimal" "empty")) }}
{{- fail (printf "profile %q is not one of default, demo, minimal, empty" $name) }}
{{- end }}
{{- $profile := include (printf "weftd.profile.%s" $name) . | fromYaml }}
{{- $user := omit .Values "_internal_defaults_do_not_set" "profile" }}
{{- $merged := mergeOverwrite (deepCopy .Values._internal_defaults_do_not_set) $profile $user }}
{{- range $key, $_ := $merged.meshConfig }}
{{- if not (has $key (list "trustDomain" "accessLogFile" "pathNormalization")) }}
{{- fail (printf "meshConfig.%s: Weft does not act on it; it acts on trustDomain, accessLogFile and pathNormalization" $key) }}
{{- end }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/* A revisioned name: <name>, or <name>-<revision>. */}}
{{- define "weftd.name" -}}
{{ .name }}{{ if .revision }}-{{ .revision }}{{ end }}
{{- end }}

{{/* <hub>/<image>:<tag>, or the image as given when it holds a "/". */}}
{{- define "weftd.image" -}}
{{- if contains "/" .image }}{{ .image }}{{ else }}{{ .hub }}/{{ .image }}:{{ .tag }}{{ end }}
{{- end }}

{{- define "weftd.labels" -}}
app.kubernetes.io/part-of: weft
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
